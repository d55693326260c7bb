"""A gRPC client metalgraph did not write: code generated from proto/metalgraph.proto by
grpcio-tools at run time. It stores a graph, runs it, watches it to its end, and prints
one JSON line with what it saw.

Usage: grpc_client.py PROTO_DIR OUT_DIR HOST:PORT

With METALGRAPH_CA_CERT set it connects over TLS trusting that CA
(grpc.ssl_channel_credentials); with METALGRAPH_TOKEN set it sends the token as
`authorization: Bearer ...` on every call.
"""
import json
import os
import sys

from grpc_tools import protoc
from importlib.resources import files


def main():
    proto_dir, out_dir, target = sys.argv[1:4]
    # grpc_tools ships the well-known protos (struct.proto, timestamp.proto) beside itself.
    include = str(files("grpc_tools") / "_proto")
    rc = protoc.main(["protoc", f"-I{proto_dir}", f"-I{include}", f"--python_out={out_dir}",
                      f"--grpc_python_out={out_dir}", f"{proto_dir}/metalgraph.proto"])
    if rc != 0:
        sys.exit(f"protoc failed with {rc}")
    sys.path.insert(0, out_dir)
    import grpc
    import metalgraph_pb2 as pb
    import metalgraph_pb2_grpc as rpc
    from google.protobuf import struct_pb2

    ca = os.environ.get("METALGRAPH_CA_CERT")
    token = os.environ.get("METALGRAPH_TOKEN")
    if ca:
        with open(ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        if token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
        channel = grpc.secure_channel(target, creds)
    else:
        channel = grpc.insecure_channel(target)
    grpc.channel_ready_future(channel).result(timeout=20)
    defs = rpc.DefinitionsStub(channel)
    wfs = rpc.WorkflowsStub(channel)
    graph = pb.Graph(injectable_name="Python.Client", tasks=[
        pb.GraphTask(label="first", task_name="Task.Noop"),
        pb.GraphTask(label="second", task_name="Task.Wait",
                     option_overrides=struct_pb2.Struct(fields={"duration": struct_pb2.Value(string_value="100ms")}),
                     wait_on=[pb.WaitOn(label="first", states=["succeeded"])]),
    ])
    defs.PutGraph(pb.PutGraphRequest(graph=graph))
    wf = wfs.RunGraph(pb.RunGraphRequest(name="Python.Client"))
    seen = []
    for ev in wfs.Watch(pb.WatchRequest(workflow_id=wf.instance_id)):
        kind = ev.WhichOneof("event")
        if kind == "workflow":
            seen.append("wf:" + pb.WorkflowStatus.Name(ev.workflow.status))
        else:
            seen.append(ev.task.label + ":" + pb.TaskState.Name(ev.task.state))
    try:
        wfs.GetWorkflow(pb.GetWorkflowRequest(id="no-such-workflow"))
        missing = "OK"
    except grpc.RpcError as e:
        missing = e.code().name
    final = wfs.GetWorkflow(pb.GetWorkflowRequest(id=wf.instance_id))
    print(json.dumps({"id": wf.instance_id, "events": seen,
                      "status": pb.WorkflowStatus.Name(final.status), "missing": missing}))


if __name__ == "__main__":
    main()
