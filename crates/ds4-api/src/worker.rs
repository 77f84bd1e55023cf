//! The bounded request queue and the one inference worker thread.
//!
//! Request handlers render and tokenize in parallel, then [`Worker::submit`] a job. The
//! queue is bounded (`--max-queue`): when it is full the handler answers 429 with
//! `Retry-After` instead of piling up work (API.md GAP-S2). One OS thread runs jobs in
//! FIFO order, because there is one live session and its KV state is what makes prefix
//! reuse work.
//!
//! Cancellation (GAP-S4): every job carries a flag, set by [`CancelOnDrop`] when the
//! handler's future or the SSE body is dropped, which is what hyper does when the client
//! disconnects. A queued job whose flag is set is skipped without prefill; a running one
//! stops at the next prefill chunk or token, freeing the worker.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ds4_model::generate::{Event, GenOptions};
use tokio::sync::mpsc;

use crate::engine::{Engine, Generation};
use crate::metrics::Metrics;

/// What the worker sends back for one job.
#[derive(Debug)]
pub enum WorkerMsg {
    /// The job left the queue and prefill started or progressed: `(done, total)`.
    Progress(usize, usize),
    /// Output of the generation loop.
    Event(Event),
    /// The job ended (last message).
    Finished(Result<Generation, String>),
}

struct Job {
    tokens: Vec<u32>,
    opts: GenOptions,
    cancel: Arc<AtomicBool>,
    tx: mpsc::UnboundedSender<WorkerMsg>,
    enqueued: Instant,
}

/// Why a job was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The queue is full (429).
    Full,
    /// The worker is gone or shutting down (503).
    Closed,
}

/// Sets a job's cancel flag when dropped.
#[derive(Debug)]
pub struct CancelOnDrop(pub Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A queued job: its message stream and the guard that cancels it when dropped.
#[derive(Debug)]
pub struct JobHandle {
    /// Messages from the worker, ending with [`WorkerMsg::Finished`].
    pub rx: mpsc::UnboundedReceiver<WorkerMsg>,
    /// Cancels the job when dropped (client gone).
    pub guard: CancelOnDrop,
}

/// Handle to the queue and the worker thread.
#[derive(Debug, Clone)]
pub struct Worker {
    tx: mpsc::Sender<Job>,
    depth: Arc<AtomicUsize>,
    current: Arc<Mutex<Option<Arc<AtomicBool>>>>,
    closed: Arc<AtomicBool>,
}

impl Worker {
    /// Starts the worker thread over `engine` with room for `max_queue` waiting jobs.
    pub fn start(engine: Arc<dyn Engine>, max_queue: usize, metrics: Arc<Metrics>) -> Worker {
        let (tx, mut rx) = mpsc::channel::<Job>(max_queue.max(1));
        let depth = Arc::new(AtomicUsize::new(0));
        let current: Arc<Mutex<Option<Arc<AtomicBool>>>> = Arc::new(Mutex::new(None));
        let closed = Arc::new(AtomicBool::new(false));
        let w = Worker {
            tx,
            depth: depth.clone(),
            current: current.clone(),
            closed: closed.clone(),
        };
        let spawn = std::thread::Builder::new()
            .name("ds4-worker".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    depth.fetch_sub(1, Ordering::Relaxed);
                    if job.cancel.load(Ordering::Relaxed) || closed.load(Ordering::Relaxed) {
                        metrics.cancelled_in_queue();
                        let _ = job
                            .tx
                            .send(WorkerMsg::Finished(Err("request cancelled".into())));
                        continue;
                    }
                    *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(job.cancel.clone());
                    let wait = job.enqueued.elapsed().as_secs_f64();
                    let tx = job.tx.clone();
                    let cancel = job.cancel.clone();
                    // A failed send means the client is gone: cancel the generation.
                    let mut on_progress = |done, total| {
                        if tx.send(WorkerMsg::Progress(done, total)).is_err() {
                            cancel.store(true, Ordering::Relaxed);
                        }
                    };
                    let tx2 = job.tx.clone();
                    let cancel2 = job.cancel.clone();
                    let mut on_event = |e| {
                        if tx2.send(WorkerMsg::Event(e)).is_err() {
                            cancel2.store(true, Ordering::Relaxed);
                        }
                    };
                    let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        engine.generate(&job.tokens, &job.opts, &mut on_progress, &mut on_event)
                    }));
                    *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    let msg = match res {
                        Ok(Ok(g)) => {
                            metrics.generation(&g.outcome, wait);
                            Ok(g)
                        }
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err("generation panicked".into()),
                    };
                    let _ = job.tx.send(WorkerMsg::Finished(msg));
                }
            });
        if let Err(e) = spawn {
            eprintln!("ds4-server: cannot start the worker thread: {e}");
        }
        w
    }

    /// Queues a generation of `tokens`; `opts.cancel` is replaced by the job's flag.
    pub fn submit(&self, tokens: Vec<u32>, mut opts: GenOptions) -> Result<JobHandle, SubmitError> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(SubmitError::Closed);
        }
        let cancel = Arc::new(AtomicBool::new(false));
        opts.cancel = Some(cancel.clone());
        let (tx, rx) = mpsc::unbounded_channel();
        let job = Job {
            tokens,
            opts,
            cancel: cancel.clone(),
            tx,
            enqueued: Instant::now(),
        };
        self.depth.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(job) {
            Ok(()) => Ok(JobHandle {
                rx,
                guard: CancelOnDrop(cancel),
            }),
            Err(e) => {
                self.depth.fetch_sub(1, Ordering::Relaxed);
                Err(match e {
                    mpsc::error::TrySendError::Full(_) => SubmitError::Full,
                    mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
                })
            }
        }
    }

    /// Jobs waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.depth.load(Ordering::Relaxed)
    }

    /// Shutdown: refuse new jobs, drop queued ones, stop the running one.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        if let Some(c) = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            c.store(true, Ordering::Relaxed);
        }
    }
}
