//! Worker threads kept for reuse. Every connection, and every exec's input, runs on a thread;
//! a new thread costs the guest a stack mapping, its guard page, signal stack and TLS, their
//! page faults and the teardown at exit, all in guest ring 0 — which is emulated on some
//! hosts, where two new threads were a visible part of an `exec true`. A job goes to an idle
//! worker when there is one, else to a new thread (so a job never waits behind another, and
//! jobs that block on each other cannot deadlock); a worker idle for a minute ends.
//!
//! A pool belongs to one `serve` call and its workers descend from that thread, so they share
//! its mount namespace and root (host tests run several agents in one process, each in a
//! namespace of its own). A job that needs a helper thread asks [`execute_here`], which uses
//! the pool of the worker it runs on.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

pub type Job = Box<dyn FnOnce() + Send + 'static>;

/// How long an idle worker waits for a job before it ends.
pub const IDLE: Duration = Duration::from_secs(60);

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    /// Workers waiting for a job.
    idle: usize,
}

#[derive(Clone)]
pub struct Pool {
    state: Arc<(Mutex<State>, Condvar)>,
    idle_for: Duration,
}

thread_local! {
    /// The pool this thread works for, if it is a worker.
    static CURRENT: RefCell<Option<Pool>> = const { RefCell::new(None) };
}

/// Runs `job` on the pool of the worker this is called from, or on a new thread.
pub fn execute_here(job: Job) -> io::Result<()> {
    match CURRENT.with(|c| c.borrow().clone()) {
        Some(p) => p.execute(job),
        None => std::thread::Builder::new()
            .name("agent-helper".into())
            .spawn(job)
            .map(drop),
    }
}

impl Pool {
    pub fn new(idle_for: Duration) -> Pool {
        Pool {
            state: Arc::default(),
            idle_for,
        }
    }

    /// Runs `job` on an idle worker, or on a new thread when every worker is busy. The error
    /// is a thread that could not start (the job is then dropped, not run).
    pub fn execute(&self, job: Job) -> io::Result<()> {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        if st.idle > st.jobs.len() {
            st.jobs.push_back(job);
            cv.notify_one();
            return Ok(());
        }
        drop(st);
        let pool = self.clone();
        std::thread::Builder::new()
            .name("agent-worker".into())
            .spawn(move || {
                CURRENT.with(|c| *c.borrow_mut() = Some(pool.clone()));
                worker(&pool.state, pool.idle_for, job)
            })
            .map(drop)
    }

    /// Workers waiting for a job (for tests).
    pub fn idle(&self) -> usize {
        self.state.0.lock().unwrap_or_else(|e| e.into_inner()).idle
    }
}

fn worker(state: &(Mutex<State>, Condvar), idle_for: Duration, first: Job) {
    let (lock, cv) = state;
    let mut job = first;
    loop {
        job();
        let mut st = lock.lock().unwrap_or_else(|e| e.into_inner());
        st.idle += 1;
        job = loop {
            if let Some(j) = st.jobs.pop_front() {
                st.idle -= 1;
                break j;
            }
            let (g, wait) = cv
                .wait_timeout(st, idle_for)
                .unwrap_or_else(|e| e.into_inner());
            st = g;
            // A job queued just as the wait ran out is still taken above; only an empty
            // queue ends the worker.
            if wait.timed_out() && st.jobs.is_empty() {
                st.idle -= 1;
                return;
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    #[test]
    fn workers_are_reused_and_idle_ones_end() {
        let pool = Pool::new(Duration::from_millis(300));
        let (tx, rx) = mpsc::channel();
        // Each job starts once the worker before it is back to waiting (the job's send comes
        // before that, so a job sent at once could find no idle worker and start another).
        let ids: Vec<_> = (0..4)
            .map(|_| {
                let tx = tx.clone();
                pool.execute(Box::new(move || {
                    tx.send(std::thread::current().id()).unwrap();
                }))
                .unwrap();
                let id = rx.recv().unwrap();
                let t = Instant::now();
                while pool.idle() == 0 && t.elapsed() < Duration::from_secs(5) {
                    std::thread::sleep(Duration::from_millis(5));
                }
                id
            })
            .collect();
        assert!(
            ids.windows(2).all(|w| w[0] == w[1]),
            "one worker for sequential jobs"
        );
        let t = Instant::now();
        while pool.idle() > 0 && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(pool.idle(), 0, "an idle worker ends after its wait");
    }

    #[test]
    fn a_job_asks_its_own_pool_for_helpers() {
        let pool = Pool::new(Duration::from_secs(5));
        let (tx, rx) = mpsc::channel();
        pool.execute(Box::new(move || {
            let here =
                CURRENT.with(|c| c.borrow().as_ref().map(|p| Arc::as_ptr(&p.state) as usize));
            execute_here(Box::new(move || {
                let there =
                    CURRENT.with(|c| c.borrow().as_ref().map(|p| Arc::as_ptr(&p.state) as usize));
                tx.send((here, there)).unwrap();
            }))
            .unwrap();
        }))
        .unwrap();
        let (here, there) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(here.is_some());
        assert_eq!(here, there, "the helper ran in the same pool");
    }

    #[test]
    fn jobs_that_wait_for_each_other_each_get_a_thread() {
        let pool = Pool::new(Duration::from_secs(5));
        let (a_tx, a_rx) = mpsc::channel::<()>();
        let (b_tx, b_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel();
        let d = done_tx.clone();
        // The first job blocks until the second has run: with one thread this deadlocks.
        pool.execute(Box::new(move || {
            a_rx.recv().unwrap();
            d.send(1).unwrap();
        }))
        .unwrap();
        pool.execute(Box::new(move || {
            a_tx.send(()).unwrap();
            b_rx.recv().unwrap();
            done_tx.send(2).unwrap();
        }))
        .unwrap();
        b_tx.send(()).unwrap();
        let mut got: Vec<i32> = (0..2)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(10)).unwrap())
            .collect();
        got.sort();
        assert_eq!(got, vec![1, 2]);
    }
}
