//! The `metalgraph` command: `serve` runs the engine and its APIs; the other subcommands are
//! a client of a running server, except `validate`, which checks files offline.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use metalgraph::client::draw::Drawing;
use metalgraph::client::fleet::{BatchSpec, EndpointSpec};
use metalgraph::client::out::{self, StdoutClosed};
use metalgraph::client::views::{Output, Shape};
use metalgraph::client::{Access, Client, NodeSpec, seg};
use metalgraph::config::{Config, LogFormat, ServeArgs};
use tokio_util::sync::CancellationToken;
use tracing::info;

/// A durable workflow engine for bare-metal provisioning.
#[derive(Debug, Parser)]
#[command(name = "metalgraph", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the engine with its management API (and, if configured, the node-facing API).
    Serve(Box<ServeArgs>),
    /// Graph definitions on a server.
    Graphs {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        view: View,
        #[command(subcommand)]
        action: GraphsCmd,
    },
    /// Task definitions on a server.
    Tasks {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        view: View,
        #[command(subcommand)]
        action: TasksCmd,
    },
    /// Nodes on a server.
    Nodes {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        view: View,
        #[command(subcommand)]
        action: NodesCmd,
    },
    /// Workflows on a server.
    Workflows {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        view: View,
        #[command(subcommand)]
        action: WorkflowsCmd,
    },
    /// Run a graph, optionally on a node, and optionally follow it to its end. With several
    /// --node, or --tag, it runs on each of those nodes as a batch, at most
    /// --max-concurrent at once.
    Run {
        #[command(flatten)]
        remote: Remote,
        /// The graph's injectableName.
        graph: String,
        /// The node to run on (repeatable: several make a batch).
        #[arg(long = "node")]
        nodes: Vec<String>,
        /// Run on every node carrying this tag (repeatable: every tag), as a batch.
        #[arg(long = "tag", conflicts_with = "nodes")]
        tags: Vec<String>,
        /// A batch's most workflows at once.
        #[arg(long, value_name = "N", default_value_t = 10)]
        max_concurrent: usize,
        /// A batch starts no new workflow after this many failures.
        #[arg(long, value_name = "M")]
        stop_after_failures: Option<usize>,
        /// A run option: KEY=VALUE (into options.defaults) or LABEL.KEY=VALUE (into one
        /// task's options). VALUE is JSON when it parses as JSON, else a string.
        #[arg(long = "option", short = 'o', value_name = "[LABEL.]KEY=VALUE")]
        options: Vec<String>,
        /// Follow the workflow, printing each task state change and a closing summary; exit
        /// 0 only when it succeeded. A batch shows a progress line (done, failed and running
        /// of the total, the rate, the time left) and closes with a table of the failures.
        #[arg(long)]
        wait: bool,
        /// How to print: a table for people, or the workflow object as json or yaml (with
        /// --wait, only the finished workflow). No short form here: `-o` is --option.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Rerun a failed or cancelled workflow from where it stopped: a new workflow in which
    /// the tasks that succeeded keep their output and the others run again.
    Rerun {
        #[command(flatten)]
        remote: Remote,
        /// The failed or cancelled workflow's id.
        id: String,
        /// Options over the old run's, as JSON (`{"defaults": {...}, "<label>": {...}}`), or
        /// @FILE holding them as JSON or YAML. A key given replaces that layer's value.
        #[arg(long, value_name = "JSON|@FILE")]
        options: Option<String>,
        /// One option over the old run's (and over --options): KEY=VALUE (into
        /// options.defaults) or LABEL.KEY=VALUE, as `run` takes it.
        #[arg(long = "option", short = 'o', value_name = "[LABEL.]KEY=VALUE")]
        option: Vec<String>,
        /// Follow the new workflow as `run --wait` does; exit 0 only when it succeeded.
        #[arg(long)]
        wait: bool,
        /// How to print, as for `run`.
        #[arg(long, value_enum, default_value_t)]
        output: Output,
    },
    /// Registered endpoints (Redfish services, IPMI BMCs) and the systems behind them.
    Endpoints {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        view: View,
        #[command(subcommand)]
        action: EndpointsCmd,
    },
    /// Batches: one graph run on many nodes (`run GRAPH --tag ...` makes one).
    Batches {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        view: View,
        #[command(subcommand)]
        action: BatchesCmd,
    },
    /// Bearer tokens on a server (admin only).
    Tokens {
        #[command(flatten)]
        remote: Remote,
        #[command(flatten)]
        view: View,
        #[command(subcommand)]
        action: TokensCmd,
    },
    /// Store every RackHD definition (JSON, or YAML) found under a directory — task
    /// definitions, then graphs — and report each one loaded or refused, with why.
    ImportRackhd {
        #[command(flatten)]
        remote: Remote,
        /// A directory of RackHD definitions exported as JSON (one per file, or a list).
        dir: PathBuf,
    },
    /// Rotate the secret key: re-seal every stored secret under a new key, which then
    /// replaces the old key file. Run it with the server stopped.
    Rekey {
        /// The server's data directory.
        #[arg(
            long,
            env = "METALGRAPH_DATA_DIR",
            default_value = "./metalgraph-data",
            value_name = "DIR"
        )]
        data_dir: PathBuf,
        /// The store backend.
        #[arg(long, env = "METALGRAPH_STORE", value_enum, default_value = "sled")]
        store: metalgraph::config::StoreKind,
        /// The PostgreSQL database (`--store postgres`); stop every replica first.
        #[arg(
            long,
            env = "METALGRAPH_DATABASE_URL",
            value_name = "URL",
            hide_env_values = true
        )]
        database_url: Option<String>,
        /// PEM certificates to trust for TLS to the database.
        #[arg(long, env = "METALGRAPH_DATABASE_CA_FILE", value_name = "FILE")]
        database_ca_file: Option<PathBuf>,
        /// The current key file (default <data-dir>/secret.key); the new key replaces it.
        #[arg(long, env = "METALGRAPH_SECRET_KEY_FILE", value_name = "FILE")]
        secret_key_file: Option<PathBuf>,
    },
    /// Check definition files offline against the shipped library and each other.
    Validate {
        /// YAML or JSON files holding graphs and task definitions.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// How a client command prints what the server answers.
#[derive(Debug, Args)]
struct View {
    /// A table for people (the default), or the API's objects as json or yaml for
    /// machines.
    #[arg(long, short = 'o', global = true, value_enum)]
    output: Option<Output>,
}

/// Where the server is, and how to prove who we are to it.
#[derive(Debug, Args)]
struct Remote {
    /// The server's URL.
    #[arg(
        long,
        global = true,
        env = "METALGRAPH_SERVER",
        default_value = "https://127.0.0.1:8080"
    )]
    server: String,
    /// The bearer token (default: the admin.token the server wrote in --data-dir).
    #[arg(long, global = true, env = "METALGRAPH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A CA certificate (PEM) the server's certificate is signed by (default: tls/ca.pem in
    /// --data-dir, when it is there).
    #[arg(long, global = true, env = "METALGRAPH_CA_CERT", value_name = "FILE")]
    ca_cert: Option<PathBuf>,
    /// The server's data directory, where it keeps admin.token and tls/ca.pem (when the
    /// client runs on the same machine).
    #[arg(
        long,
        global = true,
        env = "METALGRAPH_DATA_DIR",
        default_value = "./metalgraph-data",
        value_name = "DIR"
    )]
    data_dir: PathBuf,
}

impl Remote {
    fn client(&self) -> anyhow::Result<Client> {
        let access = Access::resolve(self.token.clone(), self.ca_cert.as_deref(), &self.data_dir)?;
        Client::new(&self.server, &access)
    }
}

#[derive(Debug, Subcommand)]
enum GraphsCmd {
    /// List every graph (library and user).
    List,
    /// Show one graph, or draw it.
    #[command(visible_alias = "show")]
    Get {
        name: String,
        /// Draw the graph's tasks and their waitOn edges (labelled with the awaited
        /// state) instead: Graphviz dot or a Mermaid flowchart.
        #[arg(long, value_enum)]
        format: Option<Drawing>,
    },
    /// Create or replace the graphs in the files.
    Put {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Delete a user graph.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
enum TasksCmd {
    /// List every task definition (library and user).
    List,
    /// Show one task definition.
    Get { name: String },
    /// Create or replace the task definitions in the files.
    Put {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Delete a user task definition.
    Delete { name: String },
}

#[derive(Debug, Subcommand)]
enum NodesCmd {
    /// List nodes, in id order.
    List {
        /// Only nodes with this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Only nodes of this type.
        #[arg(long = "type", value_name = "TYPE")]
        node_type: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one node.
    Get { id: String },
    /// Register a node.
    Create {
        /// The node's name.
        #[arg(long)]
        name: String,
        /// The node's id (a UUID is generated when absent).
        #[arg(long)]
        id: Option<String>,
        /// A MAC address of the node (repeatable).
        #[arg(long = "mac")]
        macs: Vec<String>,
        /// A tag (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// The OBM service: redfish-obm-service, ipmi-obm-service or sim-obm-service.
        #[arg(long)]
        obm_service: Option<String>,
        /// The BMC's host (for Redfish, possibly a base URL).
        #[arg(long)]
        obm_host: Option<String>,
        /// The BMC user.
        #[arg(long)]
        obm_user: Option<String>,
        /// The environment variable holding the BMC password (never given on the command
        /// line, where `ps` would show it).
        #[arg(long, value_name = "VAR")]
        obm_password_env: Option<String>,
    },
    /// Delete a node (refused while a workflow runs on it).
    Delete { id: String },
}

/// How much of a list to show.
#[derive(Debug, clap::Args)]
struct PageArgs {
    /// How many to show, or with --all how many to read at once (1 to 1000; default 100,
    /// or 1000 with --all).
    #[arg(long, value_name = "N")]
    top: Option<usize>,
    /// Every page, however many there are.
    #[arg(long)]
    all: bool,
}

impl PageArgs {
    /// The path of a list: `base`, the filters that were given, and the page size.
    fn path<const N: usize>(&self, base: &str, filters: [(&str, Option<String>); N]) -> String {
        let mut query: Vec<String> = filters
            .into_iter()
            .filter_map(|(key, value)| Some(format!("{key}={}", seg(&value?))))
            .collect();
        match (self.all, self.top) {
            (_, Some(n)) => query.push(format!("$top={n}")),
            (true, None) => query.push("$top=1000".to_owned()),
            (false, None) => {}
        }
        if query.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", query.join("&"))
        }
    }
}

#[derive(Debug, Subcommand)]
enum EndpointsCmd {
    /// List endpoints with what uses them.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one endpoint.
    Get { id: String },
    /// Register a Redfish service or an IPMI BMC.
    Create {
        /// A unique name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        fields: EndpointFields,
    },
    /// Change an endpoint (rotate its password: --password-env VAR); every node that
    /// refers to it uses the change from its next BMC call.
    Update {
        id: String,
        /// A new name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        fields: EndpointFields,
    },
    /// Delete an endpoint (refused while its nodes run workflows).
    Delete {
        id: String,
        /// Also delete its nodes; otherwise they stay, without the endpoint's OBM.
        #[arg(long)]
        with_nodes: bool,
    },
    /// The systems behind every endpoint, or one, read live, filtered.
    Systems {
        /// Only this endpoint (id or name).
        id: Option<String>,
        /// Only systems in this power state (On, Off).
        #[arg(long)]
        power_state: Option<String>,
        #[arg(long)]
        manufacturer: Option<String>,
        #[arg(long)]
        model: Option<String>,
    },
    /// Discover the endpoint's systems as nodes.
    Discover {
        id: String,
        /// Follow the discovery to its end.
        #[arg(long)]
        wait: bool,
    },
}

/// An endpoint's fields on the command line.
#[derive(Debug, clap::Args)]
struct EndpointFields {
    /// redfish or ipmi.
    #[arg(long, value_parser = ["redfish", "ipmi"])]
    service: Option<String>,
    /// Redfish: the service's base URL (https://bmc:8443). IPMI: host or host:port.
    #[arg(long)]
    url: Option<String>,
    /// The BMC user.
    #[arg(long)]
    user: Option<String>,
    /// The environment variable holding the password (never given on the command line,
    /// where `ps` would show it).
    #[arg(long, value_name = "VAR")]
    password_env: Option<String>,
    /// Accept any TLS certificate from the service.
    #[arg(long)]
    insecure: bool,
    /// The CA certificate (PEM file) that signed the service's certificate.
    #[arg(long, value_name = "FILE")]
    ca_cert: Option<PathBuf>,
}

impl EndpointFields {
    fn spec(self, name: Option<String>) -> EndpointSpec {
        EndpointSpec {
            name,
            service: self.service,
            url: self.url,
            user: self.user,
            password_env: self.password_env,
            insecure: self.insecure,
            ca_cert: self.ca_cert,
        }
    }
}

#[derive(Debug, Subcommand)]
enum BatchesCmd {
    /// List batches, newest first.
    List {
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show a batch: its counts and every node's status, workflow and reason.
    Get { id: String },
    /// Cancel a batch: nothing more starts, running workflows are cancelled.
    Cancel { id: String },
}

#[derive(Debug, Subcommand)]
enum TokensCmd {
    /// Make a token; its secret is printed this once.
    Create {
        name: String,
        /// viewer (reads), operator (also runs and changes), admin (also tokens, webhooks,
        /// audit).
        #[arg(long, value_parser = ["viewer", "operator", "admin"])]
        role: String,
    },
    /// List tokens: names, roles, when made and last used.
    List,
    /// Revoke a token at once.
    Revoke { name: String },
}

#[derive(Debug, Subcommand)]
enum WorkflowsCmd {
    /// List workflows, newest first.
    List {
        /// Only unfinished workflows.
        #[arg(long)]
        active: bool,
        /// Only workflows of this node.
        #[arg(long)]
        node: Option<String>,
        /// Only workflows of this graph.
        #[arg(long)]
        graph: Option<String>,
        /// Only workflows in this status (pending, running, succeeded, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        #[command(flatten)]
        page: PageArgs,
    },
    /// Show one workflow.
    Get { id: String },
    /// Cancel a workflow.
    Cancel { id: String },
    /// Delete a finished workflow.
    Delete { id: String },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        // The reader of stdout went away (`| head`): what it wanted it has, so this is no
        // failure and nothing is said (see `metalgraph::client::out`).
        Err(e) if e.downcast_ref::<StdoutClosed>().is_some() => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(*args).await,
        Command::Validate { files } => validate(&files),
        Command::ImportRackhd { remote, dir } => remote.client()?.import_rackhd(&dir).await,
        Command::Rekey {
            data_dir,
            store,
            database_url,
            database_ca_file,
            secret_key_file,
        } => {
            let key = secret_key_file.unwrap_or_else(|| data_dir.join("secret.key"));
            let options = metalgraph_store::OpenOptions {
                database: metalgraph::server::database_options(
                    database_url,
                    database_ca_file.as_deref(),
                )?,
                ..Default::default()
            };
            let n = tokio::task::spawn_blocking(move || {
                metalgraph::rekey::run(&data_dir, store.backend(), &options, &key)
            })
            .await??;
            out::line(&format!(
                "re-sealed {n} records under a new key; the old key is no longer needed"
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Graphs {
            remote,
            view,
            action,
        } => {
            let c = remote.client()?;
            let o = view.output.unwrap_or_default();
            match action {
                // Every page: definitions are few enough to show whole.
                GraphsCmd::List => {
                    c.show_list("/workflows/graphs?$top=1000", true, Shape::Graphs, o)
                        .await
                }
                GraphsCmd::Get {
                    name,
                    format: Some(how),
                } => {
                    if view.output.is_some() {
                        anyhow::bail!(
                            "--format draws the graph and cannot be combined with --output"
                        );
                    }
                    c.draw_graph(&name, how).await
                }
                GraphsCmd::Get { name, format: None } => {
                    c.show(
                        &format!("/workflows/graphs/{}", seg(&name)),
                        Shape::Graph,
                        o,
                    )
                    .await
                }
                GraphsCmd::Put { files } => c.put_definitions(&files, true).await,
                GraphsCmd::Delete { name } => {
                    c.delete(
                        &format!("/workflows/graphs/{}", seg(&name)),
                        &format!("graph {name}"),
                    )
                    .await
                }
            }
        }
        Command::Tasks {
            remote,
            view,
            action,
        } => {
            let c = remote.client()?;
            let o = view.output.unwrap_or_default();
            match action {
                TasksCmd::List => {
                    c.show_list("/workflows/tasks?$top=1000", true, Shape::Tasks, o)
                        .await
                }
                TasksCmd::Get { name } => {
                    c.show(&format!("/workflows/tasks/{}", seg(&name)), Shape::Task, o)
                        .await
                }
                TasksCmd::Put { files } => c.put_definitions(&files, false).await,
                TasksCmd::Delete { name } => {
                    c.delete(
                        &format!("/workflows/tasks/{}", seg(&name)),
                        &format!("task {name}"),
                    )
                    .await
                }
            }
        }
        Command::Nodes {
            remote,
            view,
            action,
        } => {
            let c = remote.client()?;
            let o = view.output.unwrap_or_default();
            match action {
                NodesCmd::List {
                    tag,
                    node_type,
                    page,
                } => {
                    let path = page.path("/nodes", [("tag", tag), ("type", node_type)]);
                    c.show_list(&path, page.all, Shape::Nodes, o).await
                }
                NodesCmd::Get { id } => {
                    c.show(&format!("/nodes/{}", seg(&id)), Shape::Node, o)
                        .await
                }
                NodesCmd::Create {
                    name,
                    id,
                    macs,
                    tags,
                    obm_service,
                    obm_host,
                    obm_user,
                    obm_password_env,
                } => {
                    c.create_node(
                        NodeSpec {
                            id,
                            name,
                            macs,
                            tags,
                            obm_service,
                            obm_host,
                            obm_user,
                            obm_password_env,
                        },
                        o,
                    )
                    .await
                }
                NodesCmd::Delete { id } => {
                    c.delete(&format!("/nodes/{}", seg(&id)), &format!("node {id}"))
                        .await
                }
            }
        }
        Command::Workflows {
            remote,
            view,
            action,
        } => {
            let c = remote.client()?;
            let o = view.output.unwrap_or_default();
            match action {
                WorkflowsCmd::List {
                    active,
                    node,
                    graph,
                    status,
                    page,
                } => {
                    let path = page.path(
                        "/workflows",
                        [
                            ("active", active.then(|| "true".to_owned())),
                            ("node", node),
                            ("graph", graph),
                            ("status", status),
                        ],
                    );
                    c.show_list(&path, page.all, Shape::Workflows, o).await
                }
                WorkflowsCmd::Get { id } => {
                    c.show(&format!("/workflows/{}", seg(&id)), Shape::Workflow, o)
                        .await
                }
                WorkflowsCmd::Cancel { id } => c.cancel(&id, o).await,
                WorkflowsCmd::Delete { id } => {
                    c.delete(
                        &format!("/workflows/{}", seg(&id)),
                        &format!("workflow {id}"),
                    )
                    .await
                }
            }
        }
        Command::Tokens {
            remote,
            view,
            action,
        } => {
            let c = remote.client()?;
            let o = view.output.unwrap_or_default();
            match action {
                TokensCmd::Create { name, role } => {
                    let body = serde_json::json!({"name": name, "role": role});
                    let (_, created) = c
                        .call(reqwest::Method::POST, "/tokens", Some(&body))
                        .await?;
                    out::print(&metalgraph::client::views::render(
                        o,
                        Shape::NewToken,
                        &created,
                        0,
                    )?)?;
                    Ok(ExitCode::SUCCESS)
                }
                TokensCmd::List => c.show("/tokens", Shape::Tokens, o).await,
                TokensCmd::Revoke { name } => {
                    c.delete(&format!("/tokens/{}", seg(&name)), &format!("token {name}"))
                        .await
                }
            }
        }
        Command::Run {
            remote,
            graph,
            nodes,
            tags,
            max_concurrent,
            stop_after_failures,
            options,
            wait,
            output,
        } => {
            let c = remote.client()?;
            if nodes.len() > 1 || !tags.is_empty() {
                let spec = BatchSpec {
                    graph: &graph,
                    nodes: &nodes,
                    tags: &tags,
                    options: &options,
                    max_concurrent,
                    stop_after_failures,
                };
                c.run_batch(spec, wait, output).await
            } else {
                c.run(
                    &graph,
                    nodes.first().map(String::as_str),
                    &options,
                    wait,
                    output,
                )
                .await
            }
        }
        Command::Endpoints {
            remote,
            view,
            action,
        } => {
            let c = remote.client()?;
            let o = view.output.unwrap_or_default();
            match action {
                EndpointsCmd::List { page } => {
                    c.show_list(&page.path("/endpoints", []), page.all, Shape::Endpoints, o)
                        .await
                }
                EndpointsCmd::Get { id } => {
                    c.show(&format!("/endpoints/{}", seg(&id)), Shape::Endpoint, o)
                        .await
                }
                EndpointsCmd::Create { name, fields } => {
                    c.create_endpoint(fields.spec(Some(name)), o).await
                }
                EndpointsCmd::Update { id, name, fields } => {
                    c.update_endpoint(&id, fields.spec(name), o).await
                }
                EndpointsCmd::Delete { id, with_nodes } => c.delete_endpoint(&id, with_nodes).await,
                EndpointsCmd::Systems {
                    id,
                    power_state,
                    manufacturer,
                    model,
                } => {
                    let path = PageArgs {
                        top: None,
                        all: false,
                    }
                    .path(
                        "/systems",
                        [
                            ("endpoint", id),
                            ("powerState", power_state),
                            ("manufacturer", manufacturer),
                            ("model", model),
                        ],
                    );
                    c.show(&path, Shape::Systems, o).await
                }
                EndpointsCmd::Discover { id, wait } => c.discover_endpoint(&id, wait, o).await,
            }
        }
        Command::Batches {
            remote,
            view,
            action,
        } => {
            let c = remote.client()?;
            let o = view.output.unwrap_or_default();
            match action {
                BatchesCmd::List { page } => {
                    c.show_list(&page.path("/batches", []), page.all, Shape::Batches, o)
                        .await
                }
                BatchesCmd::Get { id } => {
                    c.show(&format!("/batches/{}", seg(&id)), Shape::Batch, o)
                        .await
                }
                BatchesCmd::Cancel { id } => c.cancel_batch(&id, o).await,
            }
        }
        Command::Rerun {
            remote,
            id,
            options,
            option,
            wait,
            output,
        } => {
            let options = metalgraph::client::rerun_options(options.as_deref(), &option)?;
            remote.client()?.rerun(&id, options, wait, output).await
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(&args, &|k| std::env::var(k).ok())?;
    init_logging(config.log_format);
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            info!("shutdown requested");
            shutdown.cancel();
        }
    });
    metalgraph::server::serve(config, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Logs go to stderr, as text or JSON, at the level `RUST_LOG` names (default `info`).
fn init_logging(format: LogFormat) {
    use std::io::IsTerminal as _;

    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn validate(files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    let mut texts = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        texts.push((f.display().to_string(), text));
    }
    let library = metalgraph::library::library()?;
    let reports = metalgraph::validate::validate(&texts, &library, &metalgraph::server::jobs());
    let mut ok = true;
    for r in reports {
        for w in &r.warnings {
            out::line(&format!("warning: {}: {w}", r.file))?;
        }
        if r.problems.is_empty() {
            out::line(&format!("ok {}", r.file))?;
        } else {
            ok = false;
            for p in r.problems {
                out::line(&p.to_string())?;
            }
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
