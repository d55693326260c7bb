//! The benchmark harness at tiny sizes, so that it keeps working between the runs that
//! publish numbers: every scenario (chain, fan-out, recovery after SIGKILL, the API under
//! `wrk`, the TaskFlow peer) on both backends, boot files over TFTP and HTTP beside
//! tftpd-hpa and nginx, one perfdhcp step against full DHCP on each backend and against Kea
//! in network namespaces, a rack of ten machines booting at once (DHCP, TFTP, profile,
//! kernel and initrd) against metalgraph and against dnsmasq, tftpd-hpa and nginx, the
//! report rendered, and no workflow lost. `wrk`, the peer's venv, `curl`, tftpd-hpa, nginx,
//! dnsmasq, perfdhcp, Kea and root (for the namespaces) are optional here: without them
//! those parts are skipped with a note, as in the full harness.

// The harness's modules, compiled into this test exactly as `cargo bench` compiles them.
// Helpers only the harness's command line uses would warn here as dead code.
#[allow(dead_code)]
#[path = "../benches/harness/api.rs"]
mod api;
#[path = "../benches/harness/boot.rs"]
mod boot;
#[path = "../benches/harness/dhcp.rs"]
mod dhcp;
#[allow(dead_code)]
#[path = "../benches/harness/fsync.rs"]
mod fsync;
#[allow(dead_code)]
#[path = "../benches/harness/graphs.rs"]
mod graphs;
#[allow(dead_code)]
#[path = "../benches/harness/history.rs"]
mod history;

#[path = "../benches/harness/inproc.rs"]
mod inproc;
#[allow(dead_code)]
#[path = "../benches/harness/machine.rs"]
mod machine;
#[allow(dead_code)]
#[path = "../benches/harness/metered.rs"]
mod metered;
#[path = "../benches/harness/netns.rs"]
mod netns;
#[allow(dead_code)]
#[path = "../benches/harness/peer.rs"]
mod peer;
#[path = "../benches/harness/rack.rs"]
mod rack;
#[allow(dead_code)]
#[path = "../benches/harness/recovery.rs"]
mod recovery;
#[path = "../benches/harness/replicas.rs"]
mod replicas;
#[allow(dead_code)]
#[path = "../benches/harness/report.rs"]
mod report;
#[allow(dead_code)]
#[path = "../benches/harness/server.rs"]
mod server;
#[allow(dead_code)]
#[path = "../benches/harness/suite.rs"]
mod suite;
#[allow(dead_code)]
#[path = "../benches/harness/util.rs"]
mod util;

use metalgraph_store::Backend;

use crate::suite::{Outcome, Plan, Scenario, Sizes};

#[test]
fn the_harness_runs_every_scenario_at_tiny_sizes() {
    let dir = tempfile::Builder::new()
        .prefix("bench-smoke-")
        .tempdir_in(suite::default_dir())
        .expect("a scratch directory");
    let plan = Plan {
        sizes: Sizes::smoke(),
        backends: vec![Backend::Sled, Backend::File],
        scenarios: Scenario::ALL.to_vec(),
        dir: dir.path().to_owned(),
        // Run in this process: the test binary is not the harness, so it cannot re-execute
        // itself as one. The full harness isolates each scenario in a process.
        isolate: None,
        replicas: Vec::new(),
    };
    let report = suite::run(&plan);
    println!("{}", report::markdown(&report));

    assert!(report.problems().is_empty(), "{:#?}", report.problems());
    assert!(report.replicas.is_empty());
    for b in &report.backends {
        let fsync = b.fsync.done().expect("the fsync floor was measured");
        assert!(fsync.append.median > std::time::Duration::ZERO);
        assert!(fsync.overwrite.median > std::time::Duration::ZERO);

        let chain = b.chain.done().expect("the chain ran");
        assert_eq!(chain.tasks, 20);
        assert!(
            chain.store.commits as usize >= chain.tasks,
            "every transition is committed: {} commits for {} tasks",
            chain.store.commits,
            chain.tasks
        );

        let fanout = b.fanout.done().expect("the fan-out ran");
        assert_eq!((fanout.succeeded, fanout.lost), (50, 0));
        assert_eq!(fanout.tasks, 150);

        let recovery = b.recovery.done().expect("the recovery ran");
        assert_eq!((recovery.recovered, recovery.lost), (50, 0));
        assert!(recovery.to_listening <= recovery.to_all_running);

        let history = b.history.done().expect("the history scenario ran");
        assert_eq!((history.large.workflows, history.large.nodes), (2000, 200));
        assert_eq!(history.baseline.workflows, 1000);
        assert!(history.large.rss_bytes > 0 && history.large.start > std::time::Duration::ZERO);

        match &b.api {
            Outcome::Done(a) => {
                for m in [&a.secure, &a.plain] {
                    assert!(m.get.requests > 0 && m.run.requests > 0);
                    assert!(m.created > 0);
                    assert_eq!(m.lost, 0);
                }
            }
            Outcome::Skipped(why) => println!("note: API benchmark skipped: {why}"),
            Outcome::Failed(e) => panic!("the API benchmark failed: {e}"),
        }
    }
    match &report.peer {
        Outcome::Done(p) => {
            assert_eq!(p.chain_tasks, 10);
            assert_eq!(p.fanout_tasks, 2 * 3);
        }
        Outcome::Skipped(why) => println!("note: TaskFlow peer skipped: {why}"),
        Outcome::Failed(e) => panic!("the TaskFlow peer failed: {e}"),
    }
    match &report.boot {
        Outcome::Done(b) => {
            assert_eq!(b.loads.len(), 2);
            for l in &b.loads {
                // metalgraph's downloads were checked byte for byte and then timed.
                assert_eq!(l.metalgraph.walls_s.len(), 1, "{:?}", l.load);
                match &l.peer_walls {
                    Ok(w) => assert_eq!(w.walls_s.len(), 1, "{}", l.peer),
                    Err(why) => println!("note: {} not compared: {why}", l.peer),
                }
            }
        }
        Outcome::Skipped(why) => println!("note: boot files skipped: {why}"),
        Outcome::Failed(e) => panic!("the boot-file scenario failed: {e}"),
    }
    match &report.dhcp {
        Outcome::Done(d) => {
            // Both backends, then Kea when installed; one step each at 50 DORA/s.
            assert!(d.targets.len() >= 2, "{:?}", d.targets);
            for t in &d.targets {
                match &t.searches {
                    Ok(searches) => {
                        assert_eq!(searches.len(), 1, "{}", t.name);
                        let step = &searches[0].steps[0];
                        assert!(step.stats.discovers > 0, "{}: {step:?}", t.name);
                        // Not a speed check: a tiny rate on an idle server is answered.
                        assert!(step.stats.acks > 0, "{} answered nothing: {step:?}", t.name);
                    }
                    Err(why) => {
                        assert!(t.kea, "{} did not run: {why}", t.name);
                        println!("note: Kea not compared: {why}");
                    }
                }
            }
        }
        Outcome::Skipped(why) => println!("note: DHCP skipped: {why}"),
        Outcome::Failed(e) => panic!("the DHCP scenario failed: {e}"),
    }
    match &report.rack {
        Outcome::Done(r) => {
            // metalgraph, then the peer stack when installed: every machine of the rack
            // did every step, checked, without an error.
            assert_eq!(r.stacks.len(), 2, "{:?}", r.stacks);
            for s in &r.stacks {
                let rounds = match &s.rounds {
                    Ok(rounds) => rounds,
                    Err(why) => {
                        assert!(s.peer, "{} did not run: {why}", s.name);
                        println!("note: the rack's peer stack not compared: {why}");
                        continue;
                    }
                };
                assert_eq!(rounds.len(), 1, "{}", s.name);
                assert_eq!(rounds[0].machines.len(), 10, "{}", s.name);
                assert_eq!(s.errors(), 0, "{}: {:?}", s.name, s.first_error());
                for step in rack::Step::ALL {
                    let f = s.step(step);
                    assert_eq!((f.completed, f.errors), (10, 0), "{}: {step:?}", s.name);
                    assert!(f.p50 > std::time::Duration::ZERO, "{}: {step:?}", s.name);
                }
                assert!(rounds[0].wall_s > 0.0);
            }
        }
        Outcome::Skipped(why) => println!("note: rack power-on skipped: {why}"),
        Outcome::Failed(e) => panic!("the rack power-on scenario failed: {e}"),
    }
}

/// PostgreSQL, alone and with one and two replicas in the process (`--replicas`), at the
/// same tiny sizes: the one-process chain and fan-out beside the replicas', every
/// partition spread before the run, every workflow succeeded, and the table rendered.
#[test]
fn chain_and_fan_out_run_on_postgres_replicas_at_tiny_sizes() {
    let dir = tempfile::Builder::new()
        .prefix("bench-smoke-replicas-")
        .tempdir_in(suite::default_dir())
        .expect("a scratch directory");
    let plan = Plan {
        sizes: Sizes::smoke(),
        backends: vec![Backend::Postgres],
        scenarios: vec![Scenario::Chain, Scenario::FanOut],
        dir: dir.path().to_owned(),
        isolate: None,
        replicas: vec![1, 2],
    };
    let report = suite::run(&plan);
    let text = report::markdown(&report);
    println!("{text}");

    assert!(report.problems().is_empty(), "{:#?}", report.problems());
    let pg = &report.backends[0];
    assert_eq!(pg.backend, "postgres");
    assert_eq!(
        pg.fanout
            .done()
            .expect("the one-process fan-out ran")
            .succeeded,
        50
    );
    let counts: Vec<usize> = report.replicas.iter().map(|r| r.replicas).collect();
    assert_eq!(counts, [1, 2]);
    let leased = metalgraph_engine::ownership::PARTITIONS as usize + 1;
    for r in &report.replicas {
        let n = r.replicas;
        let chain = r.chain.done().expect("the chain on replicas ran");
        assert_eq!((chain.replicas, chain.tasks), (n, 20));
        assert!(chain.owner < n, "{chain:?}");
        assert!(!chain.moved, "partitions moved during the chain: {chain:?}");
        assert!(chain.per_task > std::time::Duration::ZERO);
        assert!(
            chain.seen + std::time::Duration::from_millis(2) >= chain.wall,
            "the end event came after the finishing commit: {chain:?}"
        );
        assert!(
            chain.store.commits as usize >= chain.tasks,
            "every transition is committed: {chain:?}"
        );

        let fanout = r.fanout.done().expect("the fan-out on replicas ran");
        assert_eq!((fanout.succeeded, fanout.lost, fanout.tasks), (50, 0, 150));
        assert!(
            !fanout.moved,
            "partitions moved during the fan-out: {fanout:?}"
        );
        assert!(fanout.committed_wall <= fanout.wall + std::time::Duration::from_millis(2));
        for shares in [&chain.shares, &fanout.shares] {
            assert_eq!(shares.len(), n);
            assert_eq!(shares.iter().map(|s| s.partitions).sum::<usize>(), leased);
            assert!(shares.iter().all(|s| s.partitions <= leased.div_ceil(n)));
            assert_eq!(shares.iter().filter(|s| s.sequencer).count(), 1);
        }
        // Runs went round-robin: every replica created some, so every one committed.
        assert!(
            fanout.shares.iter().all(|s| s.store.commits > 0),
            "{:?}",
            fanout.shares
        );
    }
    assert!(text.contains("### `postgres` with replicas"), "{text}");
    assert!(text.contains("| 1 replica | 2 replicas |"), "{text}");
}

#[test]
fn perfdhcp_output_is_read() {
    let text = "Running: perfdhcp -4 -l x -r 200 -R 60000 -p 1 10.77.0.1\nScenario: basic.\n\
        ***Rate statistics***\nRate: 132.648 4-way exchanges/second, expected rate: 200\n\n\
        ***Malformed Packets***\nMalformed packets: 0\n\
        ***Statistics for: DISCOVER-OFFER***\nsent packets: 199\nreceived packets: 190\n\
        drops: 9\ndrops ratio: 4.5 %\norphans: 0\nrejected leases: 0\n\
        non unique addresses: 0\n\nmin delay: 0.158 ms\navg delay: 2.849 ms\n\
        max delay: 63.501 ms\ncollected packets: 9\n\n\
        ***Statistics for: REQUEST-ACK***\nsent packets: 190\nreceived packets: 188\n\
        drops: 2\ndrops ratio: 1.053 %\norphans: 0\nrejected leases: 1\n\
        non unique addresses: 0\n\nmin delay: 0.133 ms\navg delay: 0.481 ms\n\
        max delay: 6.453 ms\ncollected packets: 0\n";
    let s = dhcp::parse_perfdhcp(text).expect("parses");
    assert_eq!(
        (s.discovers, s.offers, s.requests, s.acks, s.rejected),
        (199, 190, 190, 188, 1)
    );
    assert!((s.offer_delay_ms - 2.849).abs() < 1e-9);
    assert!((s.ack_delay_ms - 0.481).abs() < 1e-9);
    assert!(dhcp::parse_perfdhcp("perfdhcp: no such interface").is_none());
}

#[test]
fn wrk_output_is_read() {
    let text = "Running 1s test @ http://127.0.0.1:1/\n  2 threads and 16 connections\n  \
        Latency Distribution\n     50%  812.00us\n     75%    1.00ms\n     90%    1.50ms\n     \
        99%    3.25ms\n  12345 requests in 1.00s, 3.40MB read\n  Socket errors: connect 0, \
        read 2, write 0, timeout 1\n  Non-2xx or 3xx responses: 4\nRequests/sec:  12345.67\n\
        Transfer/sec:      3.40MB\ncreated: 99\n";
    let (r, created) = api::parse_wrk(text).expect("parses");
    assert_eq!(r.requests, 12345);
    assert!((r.rps - 12345.67).abs() < 1e-6);
    assert_eq!(r.p50, std::time::Duration::from_micros(812));
    assert_eq!(r.p99, std::time::Duration::from_micros(3250));
    assert_eq!(r.errors, 7);
    assert_eq!(created, Some(99));
}

#[test]
fn a_rack_machine_boots_only_the_profile_it_should() {
    let files = "http://10.77.0.1:8090/files";
    let (kernel, initrd) = (format!("{files}/vmlinuz"), format!("{files}/initrd.img"));
    let mine = rack::profile(files, " metalgraph.node=n7");
    let check = |text: &str, mark: Option<&str>| rack::read_profile(text, mark, &kernel, &initrd);
    assert_eq!(
        check(&mine, Some("metalgraph.node=n7")).expect("its own profile"),
        (kernel.clone(), initrd.clone())
    );
    assert_eq!(check(&mine, None).expect("no mark asked").0, kernel);
    let cases = [
        // Rendered for another node.
        (mine.clone(), Some("metalgraph.node=n8"), "lacks"),
        // Another server's files.
        (
            rack::profile("http://10.77.0.9:80/files", ""),
            None,
            "boots",
        ),
        // Not a rack profile at all: metalgraph's local-boot answer, say.
        ("#!ipxe\nexit\n".to_owned(), None, "not the rack profile"),
        (mine.replace("#!ipxe\n", ""), None, "not the rack profile"),
        (mine.replace("initrd --name", "echo"), None, "no initrd URL"),
    ];
    for (text, mark, why) in cases {
        let err = check(&text, mark).expect_err(why);
        assert!(format!("{err:#}").contains(why), "{why}: {err:#}");
    }
}
