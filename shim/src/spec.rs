//! What a VM honours of an OCI runtime spec (the bundle's config.json, an exec's Process): the
//! process (args, env, cwd, user, terminal) runs through the agent; memory and CPU limits
//! become the VM's memory and vCPUs (a fraction of a CPU: also its cgroup's CPU quota); host bind mounts, which cannot
//! reach a guest (vmrun has no shared filesystem), are refused. Namespaces, capabilities and
//! seccomp of the spec describe isolation inside one kernel: the VM is that boundary here,
//! and the guest runs the process as the given user without them.

use serde::Deserialize;
use thiserror::Error;
use vmrun_protocol::agent::Exec;

/// The least guest memory a container VM gets (the guest kernel, init and agent need it).
pub const MIN_MEMORY_MIB: u64 = 64;
/// The most vCPUs a CPU limit becomes.
pub const MAX_VCPUS: u8 = 32;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("config.json: {0}")]
    Parse(String),
    #[error("config.json has no process to run")]
    NoProcess,
    #[error("the process has no args")]
    NoArgs,
    #[error(
        "memory limit of {0} bytes: a VM needs at least {MIN_MEMORY_MIB} MiB; raise the limit"
    )]
    MemoryTooLow(i64),
    #[error("CPU limit quota {quota} / period {period}: give a positive quota and period")]
    BadCpu { quota: i64, period: u64 },
    #[error("mount {host} on {destination}: host bind mounts cannot reach a VM (vmrun has no shared filesystem); drop the mount or copy the files in")]
    BindMount { host: String, destination: String },
    #[error("env entry {0:?} is not KEY=VALUE")]
    BadEnv(String),
}

#[derive(Debug, Default, Deserialize)]
pub struct Spec {
    #[serde(default)]
    pub process: Option<Process>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub linux: Option<Linux>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Process {
    #[serde(default)]
    pub terminal: bool,
    #[serde(rename = "consoleSize", default)]
    pub console_size: Option<ConsoleSize>,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct ConsoleSize {
    pub height: u32,
    pub width: u32,
}

#[derive(Debug, Default, Deserialize)]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

#[derive(Debug, Default, Deserialize)]
pub struct Mount {
    #[serde(default)]
    pub destination: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub options: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Linux {
    #[serde(default)]
    pub resources: Option<Resources>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub memory: Option<Memory>,
    #[serde(default)]
    pub cpu: Option<Cpu>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Memory {
    #[serde(default)]
    pub limit: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Cpu {
    #[serde(default)]
    pub quota: Option<i64>,
    #[serde(default)]
    pub period: Option<u64>,
}

/// What the VM gets from the spec's limits.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Limits {
    pub memory_mib: Option<u64>,
    pub vcpus: Option<u8>,
    /// Percent of one CPU, for the VM's cgroup.
    pub cpu_quota: Option<u32>,
}

impl Spec {
    pub fn parse(bytes: &[u8]) -> Result<Spec, SpecError> {
        serde_json::from_slice(bytes).map_err(|e| SpecError::Parse(e.to_string()))
    }

    /// The VM's limits; bind mounts refused.
    pub fn limits(&self) -> Result<Limits, SpecError> {
        for m in &self.mounts {
            if m.kind == "bind" || m.options.iter().any(|o| o == "bind" || o == "rbind") {
                return Err(SpecError::BindMount {
                    host: m.source.clone(),
                    destination: m.destination.clone(),
                });
            }
        }
        let mut l = Limits::default();
        let res = self.linux.as_ref().and_then(|x| x.resources.as_ref());
        if let Some(limit) = res.and_then(|r| r.memory.as_ref()).and_then(|m| m.limit) {
            // -1 (or 0) is "no limit" in the runtime spec.
            if limit > 0 {
                let mib = (limit as u64).div_ceil(1 << 20);
                if mib < MIN_MEMORY_MIB {
                    return Err(SpecError::MemoryTooLow(limit));
                }
                l.memory_mib = Some(mib);
            }
        }
        if let Some(cpu) = res.and_then(|r| r.cpu.as_ref()) {
            if let Some(quota) = cpu.quota.filter(|q| *q != -1) {
                let period = cpu.period.unwrap_or(100_000);
                if quota <= 0 || period == 0 {
                    return Err(SpecError::BadCpu { quota, period });
                }
                l.vcpus = Some((quota as u64).div_ceil(period).clamp(1, MAX_VCPUS as u64) as u8);
                // Whole CPUs are the vCPUs themselves; a fraction needs the VM's cgroup
                // (refused with the reason where the host has no cgroup v2 CPU controller).
                if !(quota as u64).is_multiple_of(period) {
                    let pct = (quota as u64).saturating_mul(100) / period;
                    l.cpu_quota = Some(pct.clamp(1, 100_000) as u32);
                }
            }
        }
        Ok(l)
    }
}

impl Process {
    /// The agent request that runs this process (its env is complete, as in runc).
    pub fn exec(&self) -> Result<Exec, SpecError> {
        if self.args.is_empty() {
            return Err(SpecError::NoArgs);
        }
        let env = self
            .env
            .iter()
            .map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .ok_or_else(|| SpecError::BadEnv(kv.clone()))
            })
            .collect::<Result<_, _>>()?;
        let pty = self.terminal.then(|| {
            self.console_size.as_ref().map_or((24, 80), |c| {
                (
                    c.height.clamp(1, u16::MAX as u32) as u16,
                    c.width.clamp(1, u16::MAX as u32) as u16,
                )
            })
        });
        Ok(Exec {
            argv: self.args.clone(),
            env,
            clear_env: true,
            cwd: (!self.cwd.is_empty()).then(|| self.cwd.clone()),
            uid: Some(self.user.uid),
            gid: Some(self.user.gid),
            pty,
            timeout_ms: None,
            stdin: true,
        })
    }
}

/// runc's exit status for how a process ended (128+N for signal N).
pub fn exit_code(s: &vmrun_protocol::agent::ExitStatus) -> u32 {
    use vmrun_protocol::agent::ExitStatus;
    match s {
        ExitStatus::Exited(c) => *c as u32 & 0xff,
        ExitStatus::Signaled(n) => 128 + *n as u32,
        ExitStatus::TimedOut => 128 + libc::SIGKILL as u32,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_map_to_the_vm_and_bind_mounts_are_refused() {
        let s = Spec::parse(
            br#"{"process":{"args":["sh"],"env":["A=1"],"cwd":"/","user":{"uid":5,"gid":6}},
                "mounts":[{"destination":"/proc","type":"proc","source":"proc"}],
                "linux":{"resources":{"memory":{"limit":268435456},"cpu":{"quota":150000,"period":100000}}}}"#,
        )
        .unwrap();
        assert_eq!(
            s.limits().unwrap(),
            Limits {
                memory_mib: Some(256),
                vcpus: Some(2),
                cpu_quota: Some(150)
            }
        );
        let whole =
            Spec::parse(br#"{"linux":{"resources":{"cpu":{"quota":200000,"period":100000}}}}"#)
                .unwrap();
        assert_eq!(
            whole.limits().unwrap(),
            Limits {
                memory_mib: None,
                vcpus: Some(2),
                cpu_quota: None
            }
        );
        let x = s.process.as_ref().unwrap().exec().unwrap();
        assert_eq!((x.uid, x.gid, x.clear_env), (Some(5), Some(6), true));
        let low = Spec::parse(br#"{"linux":{"resources":{"memory":{"limit":1048576}}}}"#).unwrap();
        assert_eq!(low.limits(), Err(SpecError::MemoryTooLow(1_048_576)));
        let none =
            Spec::parse(br#"{"linux":{"resources":{"memory":{"limit":-1},"cpu":{"quota":-1}}}}"#)
                .unwrap();
        assert_eq!(none.limits().unwrap(), Limits::default());
        let bind = Spec::parse(
            br#"{"mounts":[{"destination":"/data","type":"none","source":"/srv","options":["rbind","ro"]}]}"#,
        )
        .unwrap();
        assert!(bind
            .limits()
            .unwrap_err()
            .to_string()
            .contains("/srv on /data"));
    }

    #[test]
    fn a_process_needs_args_and_well_formed_env() {
        let p = Process::default();
        assert_eq!(p.exec().unwrap_err(), SpecError::NoArgs);
        let p = Process {
            args: vec!["x".into()],
            env: vec!["NOEQUALS".into()],
            ..Default::default()
        };
        assert!(matches!(p.exec(), Err(SpecError::BadEnv(_))));
        let p = Process {
            args: vec!["x".into()],
            terminal: true,
            ..Default::default()
        };
        assert_eq!(p.exec().unwrap().pty, Some((24, 80)));
    }

    #[test]
    fn exit_codes_are_runcs() {
        use vmrun_protocol::agent::ExitStatus;
        assert_eq!(exit_code(&ExitStatus::Exited(3)), 3);
        assert_eq!(exit_code(&ExitStatus::Signaled(15)), 143);
        assert_eq!(exit_code(&ExitStatus::TimedOut), 137);
    }
}
