//! More than one vCPU through the whole product (T4): 2 and 4 vCPUs boot, the guest sees them
//! all, work pinned to each CPU finishes, the writes are captured, and the VM shuts down
//! cleanly. Where guest ring 0 is emulated this depends on the paravirtual features that make
//! a guest issue `vmcall` being hidden (a `vmcall` there livelocks the vCPU).

use vmrun::api::vm::{Overlay, Vm};
use vmrun_protocol::agent::ExitStatus;
use vmrun_tests::{read_tar, t4_images, t4_rootfs, Budget};

#[test]
fn two_and_four_vcpus_run_work_on_every_cpu() {
    let test = "two_and_four_vcpus_run_work_on_every_cpu";
    let (Some((_, _, pvm)), Some(_)) = (t4_images(test), t4_rootfs(test)) else {
        return;
    };
    for n in [2u8, 4] {
        let t = std::time::Instant::now();
        let vm = Vm::builder()
            .vcpus(n)
            .overlay(Overlay::Tmpfs { size: None })
            .boot_timeout(Budget::new(format!("a {n}-vCPU VM to boot"), 60, 300).limit())
            .start()
            .unwrap_or_else(|e| panic!("{n} vCPUs: {e}"));
        let booted = t.elapsed();
        // One busy shell loop pinned to each CPU, all at once; each leaves a file.
        let script = format!(
            "nproc; mkdir -p /work; for c in $(seq 0 {last}); do \
             taskset -c $c sh -c 'i=0; while [ $i -lt 2000 ]; do i=$((i+1)); done; \
             echo $i > /work/cpu-'$c & done; wait; ls /work",
            last = n - 1
        );
        let work = Budget::new(format!("work on each of {n} CPUs"), 30, 300);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let _ = tx.send(vm.exec(["/bin/sh", "-c", &script]));
            });
            let out = loop {
                match rx.recv_timeout(std::time::Duration::from_millis(500)) {
                    Ok(r) => break r.unwrap(),
                    Err(_) => work.check(|| vm.console_tail(30)),
                }
            };
            assert_eq!(
                out.status,
                ExitStatus::Exited(0),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            let mut lines = text.lines();
            assert_eq!(lines.next(), Some(n.to_string().as_str()), "nproc: {text}");
            let files: Vec<&str> = lines.collect();
            let want: Vec<String> = (0..n).map(|c| format!("cpu-{c}")).collect();
            assert_eq!(files, want, "every CPU finished its share");
        });
        let mut tar = Vec::new();
        vm.capture_overlay(&mut tar).unwrap();
        let entries = read_tar(&tar);
        for c in 0..n {
            let e = &entries[&format!("work/cpu-{c}")];
            assert_eq!(e.data, b"2000\n");
        }
        // A clean end: the guest powers off on its own.
        vm.agent().shutdown().unwrap();
        let off = Budget::new(format!("the {n}-vCPU VM to power off"), 30, 120);
        while vm.is_running() {
            off.check(|| vm.console_tail(30));
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        drop(vm);
        eprintln!(
            "T4 vcpus ({}): {n} vCPUs booted in {:.1}s, work on each and capture in {:.1}s",
            vmrun::host::compat::kvm_label(pvm),
            booted.as_secs_f64(),
            (t.elapsed() - booted).as_secs_f64()
        );
    }
}
