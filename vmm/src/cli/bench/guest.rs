//! Inside a real VM: boot → agent ready, exec round trip and upload throughput. Measured only
//! where the host runs guest ring 0 at speed, unless asked (then labelled as emulator figures).

use std::time::Instant;

use super::table::{mib_per_s, Goal, Row, Scale};
use vmrun::api::vm::{Overlay, Vm};

pub fn rows(scale: Scale, at_speed: bool, forced: bool) -> Vec<Row> {
    let label = if at_speed { "" } else { " [ring 0 emulated]" };
    let boot = Row::new(format!("guest boot → agent ready{label}"), "ms", Goal::None);
    let exec = Row::new(
        format!("guest exec `true` round trip{label}"),
        "µs",
        Goal::None,
    );
    let upload = Row::new(format!("guest upload 64 MiB{label}"), "MiB/s", Goal::None);
    if !at_speed && !forced {
        let why = "guest ring 0 is emulated on this host (nested PVM): figures would time the \
                   emulator; --guest measures anyway";
        return vec![boot.absent(why), exec.absent(why), upload.absent(why)];
    }
    let (boots, execs, uploads) = (scale.reps(5, 1), scale.reps(200, 20), scale.reps(5, 2));
    let mut boot_ms = Vec::new();
    let mut vm = None;
    for _ in 0..boots {
        let t = Instant::now();
        match Vm::builder()
            .overlay(Overlay::Tmpfs {
                size: Some("50%".into()),
            })
            .memory_mib(512)
            .start()
        {
            Ok(v) => {
                boot_ms.push(t.elapsed().as_secs_f64() * 1e3);
                vm = Some(v);
            }
            Err(e) => {
                let why = format!("cannot start a VM: {e}");
                return vec![
                    boot.absent(why.clone()),
                    exec.absent(why.clone()),
                    upload.absent(why),
                ];
            }
        }
    }
    let Some(vm) = vm else {
        return vec![boot.absent("no boots"), exec, upload];
    };
    let mut rtt = Vec::new();
    for _ in 0..execs {
        let t = Instant::now();
        if let Err(e) = vm.exec(["/bin/true"]) {
            return vec![boot.samples(&boot_ms), exec.absent(e.to_string()), upload];
        }
        rtt.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mut up = Vec::new();
    let data = vec![0xa5u8; 64 << 20];
    for _ in 0..uploads {
        let t = Instant::now();
        if let Err(e) = vm.upload_bytes("/tmp/vmrun-bench-upload", &data, 0o644) {
            return vec![
                boot.samples(&boot_ms),
                exec.samples(&rtt),
                upload.absent(e.to_string()),
            ];
        }
        up.push(mib_per_s(data.len() as u64, t.elapsed()));
    }
    vec![
        boot.samples(&boot_ms),
        exec.samples(&rtt),
        upload.samples(&up),
    ]
}
