//! A boot path that works 9 times in 10 is broken: boot the default image
//! 10 times, several at once, with every core kept busy (as in CI, where
//! TSC calibration used to hang TCG boots), and require every one of them
//! to reach guest-mcp and answer `exec`.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

use std::time::Instant;

use nexus_integration::{CpuHog, Harness, exec, guest_client, processes_mentioning};

const BOOTS: usize = 10;
/// 256 MiB each; three at a time keeps both cores and memory honest.
const AT_ONCE: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_boots_under_full_cpu_load_all_answer_exec() {
    let harness = std::sync::Arc::new(Harness::new().expect("harness"));
    let hog = CpuHog::start().expect("cpu hog");
    let limiter = std::sync::Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let mut tasks = Vec::new();
    for i in 0..BOOTS {
        let harness = harness.clone();
        let limiter = limiter.clone();
        tasks.push(tokio::spawn(async move {
            let _slot = limiter.acquire().await.unwrap();
            let name = format!("rel-{i}");
            let started = Instant::now();
            let vm = harness
                .boot(&name)
                .await
                .map_err(|e| format!("{name}: {e:#}"))?;
            let ready = started.elapsed();
            let outcome = async {
                let client = guest_client(&vm).await.map_err(|e| e.to_string())?;
                let answer = exec(&client, &format!("echo boot {i}"))
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = client.cancel().await;
                if answer["stdout"] != format!("boot {i}\n") {
                    return Err(format!("unexpected answer {answer}"));
                }
                Ok(())
            }
            .await;
            let run_dir = vm.run_dir().to_string_lossy().into_owned();
            vm.stop().await;
            outcome.map_err(|e| format!("{name}: {e}"))?;
            if !processes_mentioning(&run_dir).is_empty() {
                return Err(format!("{name}: processes left behind"));
            }
            Ok::<_, String>(ready)
        }));
    }
    let mut failures = Vec::new();
    let mut readies = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(ready) => readies.push(ready),
            Err(e) => failures.push(e),
        }
    }
    drop(hog);
    eprintln!("ready times under load: {readies:?}");
    assert!(
        failures.is_empty(),
        "{} of {BOOTS} boots failed: {failures:#?}",
        failures.len()
    );
}
