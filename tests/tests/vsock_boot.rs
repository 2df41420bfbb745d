//! T4: a host process opens a vsock stream into a real guest that listens, and data moves both
//! ways through the VMM's hybrid vsock with credit flow control (more bytes than either side's
//! receive buffer). The guest side is vmrun-init's `vsock-echo` test mode, in the initramfs.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use vmrun::builder::Vmm;
use vmrun::config::VsockConfig;
use vmrun::devices::legacy::serial::ConsoleSink;
use vmrun::host::compat::Compat;
use vmrun::launch::{Rootfs, VmOptions};
use vmrun::vstate::ExitReason;
use vmrun_protocol::status::Status;
use vmrun_tests::{t4_images, Budget};

/// More than vmrun's and Linux's per-connection buffers (256 KiB each), so credit must flow.
const BYTES: usize = 768 * 1024;

fn connect(path: &std::path::Path, port: u32, budget: &Budget) -> UnixStream {
    loop {
        budget.check(|| format!("the guest refused every connection to port {port}"));
        if let Ok(mut s) = UnixStream::connect(path) {
            s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
            let mut line = String::new();
            let mut r = BufReader::new(s.try_clone().unwrap());
            if r.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                return s;
            }
        }
        // Not listening yet: the guest refused (RST) and the VMM closed our stream.
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn host_stream_into_a_listening_guest_moves_data_both_ways() {
    let name = "host_stream_into_a_listening_guest_moves_data_both_ways";
    let Some((_, _, pvm)) = t4_images(name) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("vm.sock");
    let opts = VmOptions {
        rootfs: Rootfs::None,
        exec: Some("/init vsock-echo 1024 1".into()),
        compat: Compat::Auto,
        vsock: Some(VsockConfig {
            cid: 3,
            uds_path: sock.clone(),
        }),
        ..Default::default()
    };
    let t0 = Instant::now();
    let resolved = vmrun::launch::resolve(&opts, None).unwrap();
    let vmm = Vmm::start(resolved.into_config(&opts, ConsoleSink::None)).unwrap();
    let listening = Budget::new("the guest to listen on vsock port 1024", 60, 240);
    let stream = connect(&sock, 1024, &listening);
    let connected = t0.elapsed();

    let data: Vec<u8> = (0..BYTES).map(|i| (i * 7 % 251) as u8).collect();
    let mut w = stream.try_clone().unwrap();
    let expect = data.clone();
    let writer = std::thread::spawn(move || {
        w.write_all(&data).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let t1 = Instant::now();
    let mut got = Vec::with_capacity(BYTES);
    let mut r = stream;
    let echo = Budget::new("768 KiB echoed through the guest", 30, 240);
    r.set_read_timeout(Some(echo.limit())).unwrap();
    if let Err(e) = r.read_to_end(&mut got) {
        echo.overrun(&format!(
            "{e} after {} of {BYTES} bytes; console tail:\n{}",
            got.len(),
            vmm.console().last_lines(20)
        ));
    }
    let moved = t1.elapsed();
    writer.join().unwrap();
    assert_eq!(got.len(), expect.len());
    assert!(got == expect, "echoed bytes differ");

    let off = Budget::new("the echo guest to power off", 30, 120);
    let reason = vmm.wait(Some(off.limit()));
    if reason.is_none() {
        off.overrun(&vmm.console().last_lines(20));
    }
    let m = vmm.vsock_metrics().unwrap();
    eprintln!(
        "T4 vsock ({}): guest listening after {:.1}s; {} KiB echoed in {:.1}s; rx {} tx {} packets, bad {}",
        vmrun::host::compat::kvm_label(pvm),
        connected.as_secs_f64(),
        BYTES / 1024,
        moved.as_secs_f64(),
        m.rx_packets.load(std::sync::atomic::Ordering::Relaxed),
        m.tx_packets.load(std::sync::atomic::Ordering::Relaxed),
        m.bad_packets.load(std::sync::atomic::Ordering::Relaxed),
    );
    assert_eq!(
        reason,
        Some(ExitReason::Status(Status::Exited(0))),
        "{}",
        vmm.console().last_lines(30)
    );
    assert!(vmm
        .console()
        .text()
        .contains(&format!("vsock-echo: echoed {BYTES} bytes")));
    assert_eq!(m.bad_packets.load(std::sync::atomic::Ordering::Relaxed), 0);
    drop(vmm);
    assert!(!sock.exists(), "the VMM removes its socket");
}
