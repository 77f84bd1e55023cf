//! The background writer: saves run on their own thread so generation never waits for disk.
//!
//! The inference thread takes an owned snapshot of the state (a memory copy, tens of ms for
//! hundreds of MB) and hands it over with [`Writer::submit`], which never blocks: when the
//! queue is full the job is handed back and the caller decides (a continued save can be
//! skipped; a shutdown save can use [`Writer::submit_wait`]). Each job returns a [`Ticket`]
//! that can be waited on or dropped.

use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender, TrySendError};
use std::thread::JoinHandle;

use crate::error::{Error, Result};
use crate::format::SaveReason;
use crate::payload::Payload;
use crate::store::{Key, SaveOutcome, SaveRequest, Store};

/// An owned save request.
pub struct SaveJob {
    /// The rendered text of the stored tokens.
    pub text: Vec<u8>,
    /// The exact token ids.
    pub tokens: Vec<u32>,
    /// Context size of the session.
    pub ctx_size: usize,
    /// Why it is saved.
    pub reason: SaveReason,
    /// The state snapshot.
    pub payload: Box<dyn Payload + Send>,
    /// An entry this one replaces: removed once this save is durable (a consumed entry,
    /// KVCACHE.md s4.3 step 7, deleted only after its successor exists, s11.13).
    pub supersedes: Option<Key>,
}

impl std::fmt::Debug for SaveJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveJob")
            .field("text_bytes", &self.text.len())
            .field("n_tokens", &self.tokens.len())
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

/// The pending result of a submitted job.
#[derive(Debug)]
pub struct Ticket(Receiver<Result<SaveOutcome>>);

impl Ticket {
    /// Waits for the save to finish.
    pub fn wait(self) -> Result<SaveOutcome> {
        self.0.recv().map_err(|_| Error::WriterGone)?
    }

    /// The result if the save has finished.
    pub fn try_result(&self) -> Option<Result<SaveOutcome>> {
        self.0.try_recv().ok()
    }
}

type Message = (SaveJob, Sender<Result<SaveOutcome>>);

/// A thread that writes [`SaveJob`]s into a [`Store`], in submission order.
#[derive(Debug)]
pub struct Writer {
    tx: Option<SyncSender<Message>>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    /// Starts the thread; at most `queue_depth` jobs wait besides the one being written
    /// (each holds a full snapshot in RAM, so keep it small).
    pub fn spawn(store: Arc<Store>, queue_depth: usize) -> Result<Writer> {
        let (tx, rx) = mpsc::sync_channel::<Message>(queue_depth);
        let handle = std::thread::Builder::new()
            .name("ds4-kvcache-writer".into())
            .spawn(move || {
                for (job, done) in rx {
                    let req = SaveRequest {
                        text: &job.text,
                        tokens: &job.tokens,
                        ctx_size: job.ctx_size,
                        reason: job.reason,
                        payload: job.payload.as_ref(),
                    };
                    let r = store.save(&req);
                    if r.is_ok()
                        && let Some(old) = job.supersedes
                        && old != crate::store::key_of(&job.text)
                    {
                        // The successor is durable; a failed unlink leaves an entry that
                        // eviction removes later.
                        let _ = store.remove(&old);
                    }
                    // The submitter may have dropped its ticket: nothing to report then.
                    let _ = done.send(r);
                }
            })?;
        Ok(Writer {
            tx: Some(tx),
            handle: Some(handle),
        })
    }

    fn sender(&self) -> Result<&SyncSender<Message>> {
        self.tx.as_ref().ok_or(Error::WriterGone)
    }

    /// Queues a job without blocking; gives it back when the queue is full.
    pub fn submit(&self, job: SaveJob) -> std::result::Result<Ticket, SaveJob> {
        let Ok(tx) = self.sender() else {
            return Err(job);
        };
        let (done, rx) = mpsc::channel();
        match tx.try_send((job, done)) {
            Ok(()) => Ok(Ticket(rx)),
            Err(TrySendError::Full((job, _)) | TrySendError::Disconnected((job, _))) => Err(job),
        }
    }

    /// Queues a job, waiting for room in the queue.
    pub fn submit_wait(&self, job: SaveJob) -> Result<Ticket> {
        let (done, rx) = mpsc::channel();
        self.sender()?
            .send((job, done))
            .map_err(|_| Error::WriterGone)?;
        Ok(Ticket(rx))
    }

    /// Finishes every queued job and stops the thread (the shutdown path).
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        drop(self.tx.take());
        if let Some(h) = self.handle.take() {
            // A panicking writer already reported through its tickets (they error out).
            let _ = h.join();
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop();
    }
}
