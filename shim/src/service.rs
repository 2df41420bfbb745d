//! The shim's task service: one vmrun VM per container. Create packs the rootfs into a root
//! image and boots the VM (its agent answering); Start runs the spec's process through the
//! agent with its stdio on containerd's FIFOs; Exec adds processes to the same VM; Kill, Wait,
//! ResizePty and CloseIO act on a process; Delete of the init process stops the VM and removes
//! what the container made. Exit statuses are runc's (128+N for signal N). Every pid the
//! shim reports is the VM's (its VMM process on the host): guest pids mean nothing on the host.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use containerd_shim as shim;
use shim::api;
use shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskStart,
};
use shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use shim::protos::protobuf::{MessageDyn, MessageField};
use shim::protos::topics;
use shim::protos::ttrpc;
use shim::publisher::RemotePublisher;
use shim::{
    Config, Context, DeleteResponse, ExitSignal, Flags, StartOpts, TtrpcContext, TtrpcResult,
};
use vmrun::api::agent::{Event, Process as AgentProcess, ProcessInput};
use vmrun::api::vm::{Overlay, Vm};
use vmrun::api::{Rootfs, VmOptions};
use vmrun_protocol::agent::Exec;

use crate::rootfs::{self, RootImage, RootMount};
use crate::spec::{exit_code, Process, Spec, SpecError};

/// How long a stopping VM gets to shut down cleanly before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The largest config.json or exec spec read.
const MAX_SPEC: u64 = 4 << 20;

fn status(code: ttrpc::Code, msg: impl Into<String>) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg.into()))
}

fn now() -> Timestamp {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut t = Timestamp::new();
    t.seconds = d.as_secs() as i64;
    t.nanos = d.subsec_nanos() as i32;
    t
}

/// Where a process's stdio goes.
#[derive(Clone, Debug, Default)]
struct Io {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Stopped,
}

struct ProcState {
    phase: Phase,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    input: Option<ProcessInput>,
    stdin_closed: bool,
}

/// One process of a container: the init (exec id "") or an exec.
struct Proc {
    exec: Exec,
    io: Io,
    state: Mutex<ProcState>,
    done: Condvar,
}

impl Proc {
    fn new(exec: Exec, io: Io) -> Arc<Proc> {
        Arc::new(Proc {
            exec,
            io,
            state: Mutex::new(ProcState {
                phase: Phase::Created,
                exit_status: 0,
                exited_at: None,
                input: None,
                stdin_closed: false,
            }),
            done: Condvar::new(),
        })
    }

    fn state(&self) -> MutexGuard<'_, ProcState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

struct Container {
    bundle: String,
    vm: Vm,
    pid: u32,
    root: RootImage,
    init: Arc<Proc>,
    execs: HashMap<String, Arc<Proc>>,
}

impl Container {
    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .get(exec_id)
            .cloned()
            .ok_or_else(|| status(ttrpc::Code::NOT_FOUND, format!("no process {exec_id}")))
    }
}

struct Inner {
    exit: ExitSignal,
    namespace: String,
    publisher: Mutex<Option<RemotePublisher>>,
    containers: Mutex<HashMap<String, Container>>,
}

/// The shim: the Shim side (start, delete, wait) and the Task service.
#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Service {
    fn containers(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let p = self
            .inner
            .publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(p) = p.as_ref() {
            if let Err(e) = p.publish(Context::default(), topic, &self.inner.namespace, event) {
                log::warn!("publish {topic}: {e}");
            }
        }
    }

    fn with<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut Container) -> TtrpcResult<T>,
    ) -> TtrpcResult<T> {
        let mut all = self.containers();
        let c = all
            .get_mut(id)
            .ok_or_else(|| status(ttrpc::Code::NOT_FOUND, format!("no container {id}")))?;
        f(c)
    }

    /// Boots the VM of a new container.
    fn create_container(&self, req: &api::CreateTaskRequest) -> Result<Container, String> {
        let bundle = PathBuf::from(&req.bundle);
        let spec = read_bounded(&bundle.join("config.json"))?;
        let spec = Spec::parse(&spec).map_err(|e| e.to_string())?;
        let limits = spec.limits().map_err(|e| e.to_string())?;
        let exec = spec
            .process
            .as_ref()
            .ok_or(SpecError::NoProcess)
            .and_then(Process::exec)
            .map_err(|e| e.to_string())?;
        let mounts: Vec<RootMount> = req
            .rootfs
            .iter()
            .map(|m| RootMount {
                kind: m.type_.clone(),
                source: m.source.clone(),
                options: m.options.clone(),
            })
            .collect();
        let cache = vmrun::launch::images::cache_dir().join("containerd");
        let root = rootfs::root_image(&bundle, &mounts, &cache).map_err(|e| e.to_string())?;
        let opts = VmOptions {
            rootfs: Rootfs::Path(root.path.clone()),
            overlay: Some(Overlay::Tmpfs { size: None }),
            memory_mib: limits.memory_mib,
            vcpus: limits.vcpus.unwrap_or(1),
            cpu_quota: limits.cpu_quota,
            ..Default::default()
        };
        let vm = match Vm::builder().options(opts).start() {
            Ok(vm) => vm,
            Err(e) => {
                remove_owned(&root);
                return Err(format!("start the container's VM: {e}"));
            }
        };
        let pid = vm.vmm_pid().unwrap_or(0);
        let io = Io {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        Ok(Container {
            bundle: req.bundle.clone(),
            vm,
            pid,
            root,
            init: Proc::new(exec, io),
            execs: HashMap::new(),
        })
    }

    /// Forwards a running process's stdio and records its end.
    fn pump(
        &self,
        p: Arc<Proc>,
        mut running: AgentProcess,
        container: String,
        exec_id: String,
        pid: u32,
    ) {
        let out = open_fifo(&p.io.stdout);
        let err = if p.io.terminal {
            None
        } else {
            open_fifo(&p.io.stderr)
        };
        let input = running.input();
        let feeder = match open_fifo(&p.io.stdin) {
            Some(f) => {
                let (p2, input) = (p.clone(), input.clone());
                Some(std::thread::spawn(move || feed_stdin(&p2, f, &input)))
            }
            None => {
                let _ = input.close_stdin();
                None
            }
        };
        let write = |f: &Option<File>, b: &[u8]| {
            if let Some(mut f) = f.as_ref() {
                // A reader that went away (a detached client) does not stop the process.
                let _ = f.write_all(b);
            }
        };
        let code = loop {
            match running.next_event() {
                Ok(Some(Event::Stdout(b))) => write(&out, &b),
                Ok(Some(Event::Stderr(b))) => write(&err, &b),
                Ok(Some(Event::Exit(s))) => break exit_code(&s),
                // The agent or the VM went away: as if killed.
                Ok(None) | Err(_) => break 128 + libc::SIGKILL as u32,
            }
        };
        let at = now();
        {
            let mut st = p.state();
            st.phase = Phase::Stopped;
            st.exit_status = code;
            st.exited_at = Some(at.clone());
            st.input = None;
            st.stdin_closed = true;
        }
        p.done.notify_all();
        if let Some(f) = feeder {
            let _ = f.join();
        }
        // Closing the FIFOs is containerd's end of output.
        drop((out, err));
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: container.clone(),
                id: if exec_id.is_empty() {
                    container
                } else {
                    exec_id
                },
                pid,
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            }),
        );
    }
}

/// Reads a small file whole.
fn read_bounded(p: &Path) -> Result<Vec<u8>, String> {
    let f = File::open(p).map_err(|e| format!("{}: {e}", p.display()))?;
    let mut v = Vec::new();
    f.take(MAX_SPEC + 1)
        .read_to_end(&mut v)
        .map_err(|e| format!("{}: {e}", p.display()))?;
    if v.len() as u64 > MAX_SPEC {
        return Err(format!("{}: larger than {MAX_SPEC} bytes", p.display()));
    }
    Ok(v)
}

/// A FIFO of containerd's, opened read-write so that opening never blocks on the other end
/// (containerd opens its ends before it asks for the process).
fn open_fifo(path: &str) -> Option<File> {
    if path.is_empty() {
        return None;
    }
    match OpenOptions::new().read(true).write(true).open(path) {
        Ok(f) => Some(f),
        Err(e) => {
            log::warn!("open {path}: {e}");
            None
        }
    }
}

/// Copies the stdin FIFO to the process until CloseIO (or the process's end), then closes
/// the process's stdin; what was written before CloseIO is delivered first.
fn feed_stdin(p: &Proc, mut f: File, input: &ProcessInput) {
    let mut buf = vec![0u8; 32 << 10];
    loop {
        let closed = p.state().stdin_closed;
        let mut fds = [libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, if closed { 0 } else { 200 }) };
        if n > 0 && fds[0].revents & libc::POLLIN != 0 {
            match f.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if input.write_stdin(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        } else if closed {
            break;
        }
    }
    let _ = input.close_stdin();
}

fn remove_owned(root: &RootImage) {
    if root.owned {
        let _ = std::fs::remove_file(&root.path);
    }
}

impl shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Service {
            inner: Arc::new(Inner {
                exit: ExitSignal::default(),
                namespace: args.namespace.clone(),
                publisher: Mutex::new(None),
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, shim::Error> {
        let grouping = opts.id.clone();
        let (_, address) = shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    /// containerd's cleanup after a shim that died: the bundle (the working directory) loses
    /// what the shim made in it; the VM went with the shim (it was the shim's child).
    fn delete_shim(&mut self) -> Result<DeleteResponse, shim::Error> {
        if let Ok(cwd) = std::env::current_dir() {
            let _ = nix::mount::umount2(&cwd.join("rootfs"), nix::mount::MntFlags::MNT_DETACH);
            let _ = std::fs::remove_file(cwd.join("vmrun-root.erofs"));
        }
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(now()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.inner.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        *self
            .inner
            .publisher
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(publisher);
        self.clone()
    }
}

impl shim::Task for Service {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.containers().contains_key(&req.id) {
            return Err(status(
                ttrpc::Code::ALREADY_EXISTS,
                format!("container {} exists", req.id),
            ));
        }
        if !req.checkpoint.is_empty() {
            return Err(status(
                ttrpc::Code::UNIMPLEMENTED,
                "restoring a checkpoint: use vmrun's snapshots",
            ));
        }
        let c = self
            .create_container(&req)
            .map_err(|e| status(ttrpc::Code::FAILED_PRECONDITION, e))?;
        let pid = c.pid;
        self.containers().insert(req.id.clone(), c);
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let (p, running, pid) = self.with(&req.id, |c| {
            let p = c.process(&req.exec_id)?;
            if p.state().phase != Phase::Created {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    "the process was started already",
                ));
            }
            let running = c
                .vm
                .spawn(p.exec.clone())
                .map_err(|e| status(ttrpc::Code::INTERNAL, format!("start the process: {e}")))?;
            Ok((p, running, c.pid))
        })?;
        {
            let mut st = p.state();
            st.phase = Phase::Running;
            st.input = Some(running.input());
        }
        let svc = self.clone();
        let (id, exec_id) = (req.id.clone(), req.exec_id.clone());
        let p2 = p.clone();
        std::thread::spawn(move || svc.pump(p2, running, id, exec_id, pid));
        if req.exec_id.is_empty() {
            self.publish(
                topics::TASK_START_EVENT_TOPIC,
                Box::new(TaskStart {
                    container_id: req.id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                topics::TASK_EXEC_STARTED_EVENT_TOPIC,
                Box::new(TaskExecStarted {
                    container_id: req.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                }),
            );
        }
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<api::Empty> {
        let spec: Process = serde_json::from_slice(&req.spec.value).map_err(|e| {
            status(
                ttrpc::Code::INVALID_ARGUMENT,
                format!("the exec's process: {e}"),
            )
        })?;
        let exec = spec
            .exec()
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, e.to_string()))?;
        self.with(&req.id, |c| {
            if c.execs.contains_key(&req.exec_id) || req.exec_id.is_empty() {
                return Err(status(
                    ttrpc::Code::ALREADY_EXISTS,
                    format!("exec id {:?} is taken or empty", req.exec_id),
                ));
            }
            let io = Io {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            };
            c.execs.insert(req.exec_id.clone(), Proc::new(exec, io));
            Ok(())
        })?;
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(api::Empty::default())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<api::Empty> {
        let procs: Vec<Arc<Proc>> = self.with(&req.id, |c| {
            Ok(if req.all {
                std::iter::once(c.init.clone())
                    .chain(c.execs.values().cloned())
                    .collect()
            } else {
                vec![c.process(&req.exec_id)?]
            })
        })?;
        let sig = i32::try_from(req.signal)
            .map_err(|_| status(ttrpc::Code::INVALID_ARGUMENT, "no such signal"))?;
        let mut delivered = false;
        for p in procs {
            let input = p.state().input.clone();
            if let Some(i) = input {
                i.signal(sig)
                    .map_err(|e| status(ttrpc::Code::INTERNAL, format!("signal: {e}")))?;
                delivered = true;
            }
        }
        if delivered || req.all {
            Ok(api::Empty::default())
        } else {
            Err(status(ttrpc::Code::NOT_FOUND, "process already finished"))
        }
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        let p = self.with(&req.id, |c| c.process(&req.exec_id))?;
        let mut st = p.state();
        while st.phase != Phase::Stopped {
            st = p.done.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        Ok(api::WaitResponse {
            exit_status: st.exit_status,
            exited_at: st.exited_at.clone().into(),
            ..Default::default()
        })
    }

    fn delete(&self, _ctx: &TtrpcContext, req: api::DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let mut all = self.containers();
        let c = all
            .get_mut(&req.id)
            .ok_or_else(|| status(ttrpc::Code::NOT_FOUND, format!("no container {}", req.id)))?;
        let p = c.process(&req.exec_id)?;
        let (exit_status, exited_at) = {
            let st = p.state();
            if st.phase == Phase::Running {
                return Err(status(
                    ttrpc::Code::FAILED_PRECONDITION,
                    "the process is running; kill it first",
                ));
            }
            (st.exit_status, st.exited_at.clone().unwrap_or_else(now))
        };
        let pid = c.pid;
        if !req.exec_id.is_empty() {
            c.execs.remove(&req.exec_id);
            return Ok(DeleteResponse {
                pid,
                exit_status,
                exited_at: MessageField::some(exited_at),
                ..Default::default()
            });
        }
        let c = all.remove(&req.id).expect("looked up above");
        drop(all);
        if let Err(e) = c.vm.stop(STOP_GRACE) {
            log::warn!("stop the VM of {}: {e}", req.id);
        }
        remove_owned(&c.root);
        let _ = nix::mount::umount2(
            &Path::new(&c.bundle).join("rootfs"),
            nix::mount::MntFlags::MNT_DETACH,
        );
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: req.id.clone(),
                pid,
                exit_status,
                exited_at: MessageField::some(exited_at.clone()),
                id: req.id.clone(),
                ..Default::default()
            }),
        );
        Ok(DeleteResponse {
            pid,
            exit_status,
            exited_at: MessageField::some(exited_at),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        self.with(&req.id, |c| {
            Ok(api::PidsResponse {
                processes: vec![shim::protos::types::task::ProcessInfo {
                    pid: c.pid,
                    ..Default::default()
                }],
                ..Default::default()
            })
        })
    }

    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.with(&req.id, |c| {
            let p = c.process(&req.exec_id)?;
            let st = p.state();
            let s = match st.phase {
                Phase::Created => api::Status::CREATED,
                Phase::Running => api::Status::RUNNING,
                Phase::Stopped => api::Status::STOPPED,
            };
            Ok(api::StateResponse {
                id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                bundle: c.bundle.clone(),
                pid: c.pid,
                status: s.into(),
                stdin: p.io.stdin.clone(),
                stdout: p.io.stdout.clone(),
                stderr: p.io.stderr.clone(),
                terminal: p.io.terminal,
                exit_status: st.exit_status,
                exited_at: st.exited_at.clone().into(),
                ..Default::default()
            })
        })
    }

    fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<api::Empty> {
        let p = self.with(&req.id, |c| c.process(&req.exec_id))?;
        let input = p.state().input.clone();
        if let Some(i) = input {
            let clamp = |v: u32| v.clamp(1, u16::MAX as u32) as u16;
            i.resize(clamp(req.height), clamp(req.width))
                .map_err(|e| status(ttrpc::Code::INTERNAL, format!("resize: {e}")))?;
        }
        Ok(api::Empty::default())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<api::Empty> {
        let p = self.with(&req.id, |c| c.process(&req.exec_id))?;
        p.state().stdin_closed = true;
        Ok(api::Empty::default())
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.containers().get(&req.id).map_or(0, |c| c.pid);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: api::ShutdownRequest) -> TtrpcResult<api::Empty> {
        if self.containers().is_empty() {
            self.inner.exit.signal();
        }
        Ok(api::Empty::default())
    }
}
