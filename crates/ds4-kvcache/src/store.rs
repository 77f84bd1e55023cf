//! The cache directory: an in-memory index of entries, lookup by longest text prefix,
//! crash-safe saves under a hard space budget, and coordination between processes.
//!
//! Directory contents (everything else is left alone and not counted):
//!
//! | name | what |
//! |---|---|
//! | `<40 hex sha1>.rkv` | an entry (format in `format.rs`), only ever created by `rename` |
//! | `<sha1>.meta` | 32-byte sidecar: hit count and last use, replaced atomically by `rename` |
//! | `<sha1>.rkv.tmp.<pid>.<n>` | an entry being written, `flock`ed by its writer |
//! | `<sha1>.meta.tmp.<pid>.<n>` | a sidecar being written (only under the directory lock) |
//! | `.lock` | `flock`ed for every change of the directory; bytes 0..8 hold a generation counter |
//!
//! Why it is shaped this way (KVCACHE.md s11 lists ds4's weaknesses this avoids):
//!
//! * **Crash safety.** A file becomes visible under its final name only by `rename` after
//!   `fsync`, followed by an `fsync` of the directory, so a crash leaves the old state or the
//!   complete new file. Mutable fields live in the sidecar, never rewritten in place.
//! * **Hard budget.** Before a temp file is written, the directory lock is taken, the real
//!   usage is summed (temp files of other processes included, they are extended to their
//!   final size at creation), and entries are evicted until the new file fits. Sidecar
//!   updates reserve room for their temp file the same way. So the directory never exceeds the budget, even mid-write.
//! * **Orphans.** A temp file whose writer died is unlocked; any process that can take its
//!   `flock` deletes it. Sidecars without an entry are deleted.
//! * **Bad files.** Any entry that fails a check is deleted with a warning, once; it is never
//!   retried. Files of another model (shape id) are kept, since a process running that model
//!   may share the directory, but they never match a lookup and are evicted first.
//! * **No rescans per request.** Lookups use the in-memory index. Every change bumps the
//!   generation counter in `.lock`; a lookup reads those 8 bytes and rescans only when the
//!   counter moved (another process wrote or evicted).
//! * **Loading never holds the lock.** Readers open the file and read it without locking:
//!   `rename` and `unlink` do not disturb an open file, and every byte is checksummed.

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rustix::fs::{FlockOperation, flock};
use sha1::{Digest, Sha1};

use crate::error::{Error, Result};
use crate::format::{self, EntryMeta, ModelIdentity, SaveReason};
use crate::payload::{FromSections, Payload, Sections};
use crate::policy::{self, Policy, ScoreInput};

/// SHA-1 of an entry's key text.
pub type Key = [u8; 20];

/// Size of a `.meta` sidecar.
pub const META_BYTES: u64 = 32;
const META_MAGIC: [u8; 8] = *b"DS4RKVM\0";
const LOCK_NAME: &str = ".lock";
const ENTRY_EXT: &str = ".rkv";
const META_EXT: &str = ".meta";

/// The SHA-1 key of a text.
pub fn key_of(text: &[u8]) -> Key {
    Sha1::digest(text).into()
}

/// A key as 40 lowercase hex digits (the file name stem).
pub fn key_hex(key: &Key) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn parse_hex_key(s: &str) -> Option<Key> {
    if s.len() != 40 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut k = [0u8; 20];
    for (i, b) in k.iter_mut().enumerate() {
        *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(k)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a directory entry's name says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Entry(Key),
    Meta(Key),
    EntryTemp,
    MetaTemp,
    Lock,
    Other,
}

fn classify(name: &str) -> FileKind {
    if name == LOCK_NAME {
        return FileKind::Lock;
    }
    if name.len() > 40 && name.is_char_boundary(40) {
        let (stem, rest) = name.split_at(40);
        if let Some(key) = parse_hex_key(stem) {
            if rest == ENTRY_EXT {
                return FileKind::Entry(key);
            }
            if rest == META_EXT {
                return FileKind::Meta(key);
            }
            if rest.starts_with(".rkv.tmp.") {
                return FileKind::EntryTemp;
            }
            if rest.starts_with(".meta.tmp.") {
                return FileKind::MetaTemp;
            }
        }
    }
    FileKind::Other
}

/// Configuration of a [`Store`].
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// The cache directory (created with mode 0700 if missing).
    pub dir: PathBuf,
    /// Hard cap on the bytes of all cache files in the directory (`space_mb * 2^20`).
    pub budget_bytes: u64,
    /// Save/load policy knobs.
    pub policy: Policy,
    /// Identity of the running model; entries of other shapes are never loaded.
    pub identity: ModelIdentity,
    /// `fsync` files and the directory on save (default true; turning it off trades
    /// durability across power loss, not crash atomicity, for latency).
    pub fsync: bool,
}

impl StoreConfig {
    /// ds4's defaults: 4096 MiB, default policy, fsync on.
    pub fn new(dir: impl Into<PathBuf>, identity: ModelIdentity) -> StoreConfig {
        StoreConfig {
            dir: dir.into(),
            budget_bytes: 4096 << 20,
            policy: Policy::default(),
            identity,
            fsync: true,
        }
    }

    /// Sets the budget in MiB (`--kv-disk-space-mb`).
    pub fn with_space_mb(mut self, space_mb: u64) -> StoreConfig {
        self.budget_bytes = space_mb.saturating_mul(1 << 20);
        self
    }
}

/// What the index knows about one entry.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryInfo {
    /// SHA-1 of the key text.
    pub key: Key,
    /// Length of the key text.
    pub text_bytes: u64,
    /// Stored tokens.
    pub n_tokens: u32,
    /// Context size of the writer.
    pub ctx_size: u32,
    /// Why it was written.
    pub reason: SaveReason,
    /// Model that wrote it.
    pub identity: ModelIdentity,
    /// Unix seconds at creation.
    pub created_at: u64,
    /// File size.
    pub file_bytes: u64,
    /// Loads so far (from the sidecar).
    pub hits: u32,
    /// Unix seconds of the last load, 0 if never (from the sidecar).
    pub last_used: u64,
    file_id: (u64, u64),
}

impl EntryInfo {
    fn score_input(&self) -> ScoreInput {
        ScoreInput {
            n_tokens: u64::from(self.n_tokens),
            file_bytes: self.file_bytes,
            hits: self.hits,
            last_used: self.last_used,
            created_at: self.created_at,
        }
    }
}

/// The result of a lookup: the longest stored prefix of the prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// The entry.
    pub entry: EntryInfo,
}

/// A loaded and fully verified entry.
#[derive(Debug)]
pub struct Loaded<T> {
    /// Index information (hits already incremented).
    pub entry: EntryInfo,
    /// The key text: a byte prefix of the prompt it was looked up for.
    pub text: Vec<u8>,
    /// The exact tokens of the stored state.
    pub tokens: Vec<u32>,
    /// The state rebuilt from the payload.
    pub state: T,
    /// Payload sections the state did not take (e.g. a tool-id map stored beside it).
    pub extra: Sections,
}

/// A save request: the live state at exactly `tokens.len()` tokens.
#[derive(Clone, Copy)]
pub struct SaveRequest<'a> {
    /// The rendered text of the stored tokens (the key is its SHA-1).
    pub text: &'a [u8],
    /// The exact token ids of the state.
    pub tokens: &'a [u32],
    /// Context size of the session.
    pub ctx_size: usize,
    /// Why it is saved.
    pub reason: SaveReason,
    /// The state.
    pub payload: &'a dyn Payload,
}

impl std::fmt::Debug for SaveRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SaveRequest")
            .field("text_bytes", &self.text.len())
            .field("n_tokens", &self.tokens.len())
            .field("ctx_size", &self.ctx_size)
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

/// What a save did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaveOutcome {
    /// A new file was written (replacing an incompatible one with the same key, if any).
    Written {
        /// The key.
        key: Key,
        /// File size.
        file_bytes: u64,
        /// Entries evicted to make room.
        n_evicted: usize,
    },
    /// A compatible entry with this key exists; nothing was written.
    AlreadyStored {
        /// The key.
        key: Key,
    },
}

/// Counters, for logs and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Entries written.
    pub n_written: u64,
    /// Entries loaded.
    pub n_loaded: u64,
    /// Entries evicted for space.
    pub n_evicted: u64,
    /// Bad files deleted.
    pub n_bad_deleted: u64,
    /// Orphan temp and sidecar files deleted.
    pub n_orphans_deleted: u64,
    /// Directory rescans (index refreshes).
    pub n_rescans: u64,
}

#[derive(Debug, Default)]
struct Inner {
    generation: u64,
    entries: HashMap<Key, EntryInfo>,
    stats: StoreStats,
}

/// Callback receiving warnings (bad files deleted, failed unlinks, ...).
pub type WarnFn = Box<dyn Fn(&str) + Send + Sync>;

/// A cache directory shared safely between threads (one `Store`) and processes.
pub struct Store {
    cfg: StoreConfig,
    lock_file: File,
    inner: Mutex<Inner>,
    warn: WarnFn,
    tmp_counter: AtomicU64,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

/// Holds the directory's `flock` until dropped.
struct DirLock<'a>(&'a File);

impl<'a> DirLock<'a> {
    fn exclusive(file: &'a File) -> Result<DirLock<'a>> {
        loop {
            match flock(file, FlockOperation::LockExclusive) {
                Ok(()) => return Ok(DirLock(file)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
        }
    }
}

impl Drop for DirLock<'_> {
    fn drop(&mut self) {
        // Closing the fd would also release it; an error here leaves nothing to undo.
        let _ = flock(self.0, FlockOperation::Unlock);
    }
}

fn file_id(md: &fs::Metadata) -> (u64, u64) {
    (md.dev(), md.ino())
}

fn is_not_found(e: &Error) -> bool {
    matches!(e, Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound)
}

impl Store {
    /// Opens (creating if needed) the cache directory: removes orphans and bad files, builds
    /// the index and evicts down to the budget.
    pub fn open(cfg: StoreConfig) -> Result<Store> {
        Store::open_with_warn(
            cfg,
            Box::new(|msg| eprintln!("ds4-kvcache: warning: {msg}")),
        )
    }

    /// [`Store::open`] with a custom warning sink.
    pub fn open_with_warn(cfg: StoreConfig, warn: WarnFn) -> Result<Store> {
        cfg.policy
            .validate()
            .map_err(|reason| Error::Invalid { reason })?;
        if cfg.budget_bytes == 0 {
            return Err(Error::Invalid {
                reason: "space budget must be > 0".into(),
            });
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&cfg.dir)?;
        let lock_file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(cfg.dir.join(LOCK_NAME))?;
        let store = Store {
            cfg,
            lock_file,
            inner: Mutex::new(Inner::default()),
            warn,
            tmp_counter: AtomicU64::new(0),
        };
        {
            let mut inner = store.lock_inner();
            let _dir = DirLock::exclusive(&store.lock_file)?;
            store.rescan_locked(&mut inner)?;
            // Over budget with nothing evictable (another process's temp file in flight):
            // not fatal, the next save evicts or fails on its own.
            if let Err(e) = store.make_room_locked(&mut inner, 0, None) {
                (store.warn)(&format!("directory over budget at open: {e}"));
            }
        }
        Ok(store)
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.cfg
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.cfg.dir
    }

    /// Counters since open.
    pub fn stats(&self) -> StoreStats {
        self.lock_inner().stats
    }

    /// The index (refreshed if another process changed the directory).
    pub fn entries(&self) -> Result<Vec<EntryInfo>> {
        let mut inner = self.lock_inner();
        self.refresh(&mut inner)?;
        Ok(inner.entries.values().cloned().collect())
    }

    /// Path of the entry file for `key`.
    pub fn entry_path(&self, key: &Key) -> PathBuf {
        self.cfg.dir.join(format!("{}{ENTRY_EXT}", key_hex(key)))
    }

    fn meta_path(&self, key: &Key) -> PathBuf {
        self.cfg.dir.join(format!("{}{META_EXT}", key_hex(key)))
    }

    fn lock_inner(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves the index possibly stale, never unsafe:
        // force a rescan instead of propagating the poison.
        self.inner.lock().unwrap_or_else(|poisoned| {
            let mut g = poisoned.into_inner();
            g.generation = u64::MAX;
            g
        })
    }

    // ===== Generation counter ===================================================================

    fn read_generation(&self) -> Result<u64> {
        let mut b = [0u8; 8];
        let n = self.lock_file.read_at(&mut b, 0)?;
        // A short or torn read only makes us rescan once more than needed.
        Ok(if n == 8 { u64::from_le_bytes(b) } else { 0 })
    }

    /// Bumps the counter (caller holds the directory lock) and keeps `inner` current if it
    /// was current before.
    fn bump_generation_locked(&self, inner: &mut Inner) -> Result<()> {
        let old = self.read_generation()?;
        let new = old.wrapping_add(1);
        self.lock_file.write_all_at(&new.to_le_bytes(), 0)?;
        if inner.generation == old {
            inner.generation = new;
        }
        Ok(())
    }

    fn refresh(&self, inner: &mut Inner) -> Result<()> {
        if self.read_generation()? == inner.generation {
            return Ok(());
        }
        let _dir = DirLock::exclusive(&self.lock_file)?;
        if self.read_generation()? != inner.generation {
            self.rescan_locked(inner)?;
        }
        Ok(())
    }

    // ===== Scanning =============================================================================

    /// Rebuilds the index from the directory (caller holds the directory lock): deletes bad
    /// entries, orphan temps and orphan sidecars.
    fn rescan_locked(&self, inner: &mut Inner) -> Result<()> {
        let generation = self.read_generation()?;
        let mut entries = HashMap::new();
        let mut metas = Vec::new();
        let mut changed = false;
        for de in fs::read_dir(&self.cfg.dir)? {
            let de = de?;
            let Some(name) = de.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let path = de.path();
            match classify(&name) {
                FileKind::Entry(key) => {
                    let md = match fs::symlink_metadata(&path) {
                        Ok(md) if md.is_file() => md,
                        _ => continue,
                    };
                    let id = file_id(&md);
                    if let Some(old) = inner.entries.get(&key)
                        && old.file_id == id
                        && old.file_bytes == md.len()
                    {
                        entries.insert(key, old.clone());
                        continue;
                    }
                    match self.read_entry_head(&path, key) {
                        Ok(info) => {
                            entries.insert(key, info);
                        }
                        Err(e) if is_not_found(&e) => {}
                        Err(e) if e.is_corruption() => {
                            self.delete_bad_locked(inner, &key, &path, &e);
                            changed = true;
                        }
                        Err(e) => return Err(e),
                    }
                }
                FileKind::Meta(key) => metas.push((key, path)),
                FileKind::EntryTemp => {
                    if self.try_remove_orphan_temp(&path) {
                        inner.stats.n_orphans_deleted += 1;
                    }
                }
                FileKind::MetaTemp => {
                    // Sidecar temps only exist while their writer holds the directory lock,
                    // which we hold: this one is an orphan.
                    if fs::remove_file(&path).is_ok() {
                        inner.stats.n_orphans_deleted += 1;
                    }
                }
                FileKind::Lock | FileKind::Other => {}
            }
        }
        for (key, path) in metas {
            match entries.get_mut(&key) {
                Some(e) => {
                    (e.hits, e.last_used) = read_meta(&path);
                }
                None => {
                    if fs::remove_file(&path).is_ok() {
                        inner.stats.n_orphans_deleted += 1;
                    }
                }
            }
        }
        inner.entries = entries;
        inner.generation = generation;
        inner.stats.n_rescans += 1;
        if changed {
            self.bump_generation_locked(inner)?;
        }
        Ok(())
    }

    fn read_entry_head(&self, path: &Path, key: Key) -> Result<EntryInfo> {
        let f = File::open(path)?;
        let md = f.metadata()?;
        let mut r = BufReader::with_capacity(64 << 10, f);
        let (h, table) = format::read_head(&mut r, md.len())?;
        Ok(EntryInfo {
            key,
            text_bytes: table[0].len,
            n_tokens: h.n_tokens,
            ctx_size: h.ctx_size,
            reason: h.reason,
            identity: h.identity,
            created_at: h.created_at,
            file_bytes: h.file_bytes,
            hits: 0,
            last_used: 0,
            file_id: file_id(&md),
        })
    }

    /// Deletes a temp entry file if its writer is gone (its `flock` can be taken).
    fn try_remove_orphan_temp(&self, path: &Path) -> bool {
        let Ok(f) = OpenOptions::new().read(true).open(path) else {
            return false;
        };
        match flock(&f, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => fs::remove_file(path).is_ok(),
            Err(_) => false,
        }
    }

    /// Deletes a bad entry and its sidecar, with a warning (caller holds the directory lock).
    fn delete_bad_locked(&self, inner: &mut Inner, key: &Key, path: &Path, why: &Error) {
        match fs::remove_file(path) {
            Ok(()) => {
                inner.stats.n_bad_deleted += 1;
                (self.warn)(&format!("deleted bad file {}: {why}", path.display()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => (self.warn)(&format!(
                "bad file {} ({why}) could not be deleted: {e}",
                path.display()
            )),
        }
        let _ = fs::remove_file(self.meta_path(key));
        inner.entries.remove(key);
    }

    /// Deletes a bad entry found outside the lock, unless it was replaced meanwhile.
    fn delete_bad(&self, key: &Key, path: &Path, id: (u64, u64), why: &Error) -> Result<()> {
        let mut inner = self.lock_inner();
        let _dir = DirLock::exclusive(&self.lock_file)?;
        match fs::symlink_metadata(path) {
            Ok(md) if file_id(&md) == id => {
                self.delete_bad_locked(&mut inner, key, path, why);
                self.bump_generation_locked(&mut inner)?;
            }
            _ => {}
        }
        Ok(())
    }

    // ===== Lookup and load ======================================================================

    fn compatible(&self, id: &ModelIdentity) -> bool {
        id.shape_id == self.cfg.identity.shape_id
            && (!self.cfg.policy.reject_different_quant
                || id.weights_id == self.cfg.identity.weights_id)
    }

    /// The entry whose key text is the longest byte prefix of `prompt` among the entries a
    /// session of context `ctx` may load. One SHA-1 pass over the prompt, whatever the number
    /// of entries: the hash state is cloned at each distinct stored length.
    pub fn lookup(&self, prompt: &[u8], ctx: usize) -> Result<Option<Hit>> {
        let mut inner = self.lock_inner();
        self.refresh(&mut inner)?;
        let mut lens: Vec<u64> = inner
            .entries
            .values()
            .filter(|e| {
                e.text_bytes <= prompt.len() as u64
                    && self.compatible(&e.identity)
                    && self
                        .cfg
                        .policy
                        .loadable(e.n_tokens as usize, e.ctx_size as usize, ctx)
            })
            .map(|e| e.text_bytes)
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        lens.sort_unstable();
        let mut hasher = Sha1::new();
        let mut pos = 0usize;
        let mut best: Option<&EntryInfo> = None;
        for len in lens {
            let len = len as usize;
            hasher.update(&prompt[pos..len]);
            pos = len;
            let key: Key = hasher.clone().finalize().into();
            if let Some(e) = inner.entries.get(&key)
                && e.text_bytes as usize == len
                && self.compatible(&e.identity)
                && self
                    .cfg
                    .policy
                    .loadable(e.n_tokens as usize, e.ctx_size as usize, ctx)
            {
                best = Some(e);
            }
        }
        Ok(best.map(|e| Hit { entry: e.clone() }))
    }

    /// Loads and verifies the entry `key` (every checksum, the model identity, the key
    /// text's hash) and rebuilds its state. A bad file is deleted and reported as
    /// [`Error::BadFile`]; the store stays usable. On success the hit count goes up.
    pub fn load<T: FromSections>(&self, key: &Key) -> Result<Loaded<T>> {
        let path = self.entry_path(key);
        let f = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // Gone (evicted by another process): make the next lookup rescan.
                self.lock_inner().generation = u64::MAX;
                return Err(Error::NotFound { key: key_hex(key) });
            }
            Err(e) => return Err(e.into()),
        };
        let md = f.metadata()?;
        let id = file_id(&md);
        let bad = |e: Error| -> Error {
            if let Err(del) = self.delete_bad(key, &path, id, &e) {
                (self.warn)(&format!("deleting {}: {del}", path.display()));
            }
            Error::BadFile {
                path: path.clone(),
                source: Box::new(e),
            }
        };
        let mut r = BufReader::with_capacity(64 << 10, f);
        let decoded = match format::read_entry(&mut r, md.len()) {
            Ok(d) => d,
            Err(e) if e.is_corruption() => return Err(bad(e)),
            Err(e) => return Err(e),
        };
        let h = &decoded.header;
        if h.identity.shape_id != self.cfg.identity.shape_id {
            return Err(Error::ModelMismatch {
                expected: self.cfg.identity.shape_id,
                found: h.identity.shape_id,
            });
        }
        if self.cfg.policy.reject_different_quant
            && h.identity.weights_id != self.cfg.identity.weights_id
        {
            return Err(Error::WeightsMismatch {
                expected: self.cfg.identity.weights_id,
                found: h.identity.weights_id,
            });
        }
        if key_of(&decoded.text) != *key {
            return Err(bad(Error::KeyMismatch {
                reason: "stored text does not hash to the file name",
            }));
        }
        let mut entry = EntryInfo {
            key: *key,
            text_bytes: decoded.text.len() as u64,
            n_tokens: h.n_tokens,
            ctx_size: h.ctx_size,
            reason: h.reason,
            identity: h.identity,
            created_at: h.created_at,
            file_bytes: h.file_bytes,
            hits: 0,
            last_used: 0,
            file_id: id,
        };
        let mut extra = decoded.sections;
        let state = match T::from_sections(&decoded.tokens, &mut extra) {
            Ok(s) => s,
            Err(e @ Error::Payload { .. }) => return Err(bad(e)),
            Err(e) => return Err(e),
        };
        (entry.hits, entry.last_used) = self.touch(key, id)?;
        Ok(Loaded {
            entry,
            text: decoded.text,
            tokens: decoded.tokens,
            state,
            extra,
        })
    }

    /// Lookup, then load; a bad or vanished candidate is dropped and the next longest is
    /// tried. `Ok(None)` means a cold prefill.
    pub fn lookup_load<T: FromSections>(
        &self,
        prompt: &[u8],
        ctx: usize,
    ) -> Result<Option<Loaded<T>>> {
        // Each failed try deletes or forgets its candidate, so this terminates; the bound
        // only guards against a directory that keeps changing under us.
        for _ in 0..16 {
            let Some(hit) = self.lookup(prompt, ctx)? else {
                return Ok(None);
            };
            match self.load::<T>(&hit.entry.key) {
                Ok(l) if prompt.starts_with(&l.text) => return Ok(Some(l)),
                Ok(_) => {
                    // A SHA-1 collision: a miss, as in ds4.
                    return Ok(None);
                }
                Err(e @ Error::BadFile { .. }) => (self.warn)(&e.to_string()),
                Err(Error::NotFound { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Records a hit in the sidecar (atomically) and the index.
    fn touch(&self, key: &Key, id: (u64, u64)) -> Result<(u32, u64)> {
        let mut inner = self.lock_inner();
        let _dir = DirLock::exclusive(&self.lock_file)?;
        inner.stats.n_loaded += 1;
        let meta_path = self.meta_path(key);
        let (hits, _) = read_meta(&meta_path);
        let hits = hits.saturating_add(1);
        let now = now_secs();
        // The file may have been evicted since we opened it; then the hit is moot.
        match fs::symlink_metadata(self.entry_path(key)) {
            Ok(md) if file_id(&md) == id => {}
            _ => return Ok((hits, now)),
        }
        // Eviction needs a current index to see every file it may delete.
        if self.read_generation()? != inner.generation {
            self.rescan_locked(&mut inner)?;
        }
        // The sidecar's temp file exists until the rename; a new sidecar also stays.
        let need = if fs::symlink_metadata(&meta_path).is_ok() {
            META_BYTES
        } else {
            2 * META_BYTES
        };
        if let Err(e) = self.make_room_locked(&mut inner, need, Some(*key)) {
            (self.warn)(&format!("hit count not recorded: {e}"));
            return Ok((hits, now));
        }
        self.write_meta_locked(key, hits, now)?;
        if let Some(e) = inner.entries.get_mut(key) {
            e.hits = hits;
            e.last_used = now;
        }
        Ok((hits, now))
    }

    fn write_meta_locked(&self, key: &Key, hits: u32, last_used: u64) -> Result<()> {
        let mut b = [0u8; META_BYTES as usize];
        b[0..8].copy_from_slice(&META_MAGIC);
        b[8..12].copy_from_slice(&hits.to_le_bytes());
        b[16..24].copy_from_slice(&last_used.to_le_bytes());
        let crc = crc32fast::hash(&b[..28]);
        b[28..32].copy_from_slice(&crc.to_le_bytes());
        let tmp = self.cfg.dir.join(format!(
            "{}{META_EXT}.tmp.{}.{}",
            key_hex(key),
            std::process::id(),
            self.tmp_counter.fetch_add(1, Ordering::Relaxed)
        ));
        let r = (|| -> Result<()> {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&b)?;
            // No fsync: after a power loss a torn sidecar reads as zero hits, which only
            // changes eviction order. The rename still makes it atomic for readers.
            fs::rename(&tmp, self.meta_path(key))?;
            Ok(())
        })();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
    }

    // ===== Budget and eviction ==================================================================

    /// Sum of the sizes of all cache files in the directory (removing dead temps on the way).
    fn dir_usage_locked(&self, inner: &mut Inner) -> Result<u64> {
        let mut total = 0u64;
        for de in fs::read_dir(&self.cfg.dir)? {
            let de = de?;
            let Some(name) = de.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let kind = classify(&name);
            if kind == FileKind::Other {
                continue;
            }
            let path = de.path();
            if kind == FileKind::EntryTemp && self.try_remove_orphan_temp(&path) {
                inner.stats.n_orphans_deleted += 1;
                continue;
            }
            match fs::symlink_metadata(&path) {
                Ok(md) if md.is_file() => total += md.len(),
                _ => {}
            }
        }
        Ok(total)
    }

    /// Evicts entries (never `protected`) until `need` more bytes fit in the budget. Caller
    /// holds the directory lock and a current index. Returns the number evicted.
    fn make_room_locked(
        &self,
        inner: &mut Inner,
        need: u64,
        protected: Option<Key>,
    ) -> Result<usize> {
        let budget = self.cfg.budget_bytes;
        let mut usage = self.dir_usage_locked(inner)?;
        if usage.saturating_add(need) <= budget {
            return Ok(0);
        }
        // Hit counts may have been updated by other processes: read the sidecars now.
        let keys: Vec<Key> = inner.entries.keys().copied().collect();
        for key in keys {
            let m = read_meta(&self.meta_path(&key));
            if let Some(e) = inner.entries.get_mut(&key) {
                (e.hits, e.last_used) = m;
            }
        }
        let now = now_secs();
        let mut n_evicted = 0;
        while usage.saturating_add(need) > budget {
            let victims: Vec<&EntryInfo> = inner
                .entries
                .values()
                .filter(|e| Some(e.key) != protected)
                .collect();
            // Entries of another model shape are useless here: they go first, oldest first.
            let foreign = victims
                .iter()
                .filter(|e| e.identity.shape_id != self.cfg.identity.shape_id)
                .min_by_key(|e| e.created_at.max(e.last_used));
            let victim = match foreign {
                Some(e) => e.key,
                None => {
                    let inputs: Vec<ScoreInput> = victims.iter().map(|e| e.score_input()).collect();
                    match policy::pick_victim(&inputs, now) {
                        Some(idx) => victims[idx].key,
                        None => {
                            if n_evicted > 0 {
                                self.bump_generation_locked(inner)?;
                            }
                            return Err(Error::NoSpace {
                                needed: need,
                                free: budget.saturating_sub(usage),
                            });
                        }
                    }
                }
            };
            let path = self.entry_path(&victim);
            let freed = fs::symlink_metadata(&path).map_or(0, |m| m.len());
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    (self.warn)(&format!("evicting {}: {e}", path.display()));
                    inner.entries.remove(&victim);
                    continue;
                }
            }
            let meta = self.meta_path(&victim);
            let meta_len = fs::symlink_metadata(&meta).map_or(0, |m| m.len());
            if fs::remove_file(&meta).is_err() {
                // No sidecar (never loaded), nothing to free.
            }
            inner.entries.remove(&victim);
            inner.stats.n_evicted += 1;
            n_evicted += 1;
            usage = usage.saturating_sub(freed + meta_len);
        }
        if n_evicted > 0 {
            self.bump_generation_locked(inner)?;
        }
        Ok(n_evicted)
    }

    // ===== Saving ===============================================================================

    /// Writes the state as a new entry, crash-safely and within the budget (see the module
    /// doc). Blocks for the whole write: call it from a background thread
    /// ([`crate::writer::Writer`]) so generation does not stall.
    pub fn save(&self, req: &SaveRequest<'_>) -> Result<SaveOutcome> {
        let sections = req.payload.sections();
        let file_bytes = format::file_bytes_for(req.text.len(), req.tokens.len(), &sections)?;
        let required = policy::budget_required(file_bytes);
        if required > self.cfg.budget_bytes {
            return Err(Error::TooLarge {
                bytes: required,
                budget: self.cfg.budget_bytes,
            });
        }
        let ctx_size = u32::try_from(req.ctx_size).map_err(|_| Error::Invalid {
            reason: format!("ctx_size {} exceeds u32", req.ctx_size),
        })?;
        if req.tokens.is_empty() {
            return Err(Error::Invalid {
                reason: "cannot save an empty state".into(),
            });
        }
        let key = key_of(req.text);
        let final_path = self.entry_path(&key);

        // Phase 1, under the lock: skip if stored, reserve space, create the temp file.
        let (tmp_path, file, n_evicted) = {
            let mut inner = self.lock_inner();
            let _dir = DirLock::exclusive(&self.lock_file)?;
            if self.read_generation()? != inner.generation {
                self.rescan_locked(&mut inner)?;
            }
            if let Some(e) = inner.entries.get(&key)
                && self.compatible(&e.identity)
                && e.ctx_size as usize <= req.ctx_size
                && e.text_bytes == req.text.len() as u64
            {
                return Ok(SaveOutcome::AlreadyStored { key });
            }
            // The old file with this key (incompatible) goes now, so it is not counted.
            if inner.entries.remove(&key).is_some() {
                let _ = fs::remove_file(&final_path);
                let _ = fs::remove_file(self.meta_path(&key));
                self.bump_generation_locked(&mut inner)?;
            }
            let n_evicted = self.make_room_locked(&mut inner, file_bytes, None)?;
            let tmp_path = self.cfg.dir.join(format!(
                "{}{ENTRY_EXT}.tmp.{}.{}",
                key_hex(&key),
                std::process::id(),
                self.tmp_counter.fetch_add(1, Ordering::Relaxed)
            ));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp_path)?;
            // Our flock marks the temp file as alive for other processes' orphan sweeps.
            let prepared = flock(&file, FlockOperation::NonBlockingLockExclusive)
                .map_err(std::io::Error::from)
                .and_then(|()| file.set_len(file_bytes));
            if let Err(e) = prepared {
                let _ = fs::remove_file(&tmp_path);
                return Err(e.into());
            }
            (tmp_path, file, n_evicted)
        };

        // Phase 2, unlocked: write and sync.
        let meta = EntryMeta {
            identity: self.cfg.identity,
            created_at: now_secs(),
            ctx_size,
            reason: req.reason,
        };
        let written = (|| -> Result<u64> {
            let mut w = BufWriter::with_capacity(1 << 20, &file);
            let n = format::write_entry(&mut w, &meta, req.text, req.tokens, &sections)?;
            w.flush()?;
            drop(w);
            if self.cfg.fsync {
                file.sync_all()?;
            }
            Ok(n)
        })();
        let written = match written {
            Ok(n) if n == file_bytes => Ok(()),
            Ok(n) => Err(Error::Corrupt {
                reason: format!("wrote {n} bytes, planned {file_bytes}"),
            }),
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp_path);
            return Err(e);
        }

        // Phase 3, under the lock: publish.
        let mut inner = self.lock_inner();
        let _dir = DirLock::exclusive(&self.lock_file)?;
        let _ = fs::remove_file(self.meta_path(&key));
        if let Err(e) = fs::rename(&tmp_path, &final_path) {
            let _ = fs::remove_file(&tmp_path);
            return Err(e.into());
        }
        drop(file);
        if self.cfg.fsync {
            File::open(&self.cfg.dir)?.sync_all()?;
        }
        let md = fs::symlink_metadata(&final_path)?;
        inner.entries.insert(
            key,
            EntryInfo {
                key,
                text_bytes: req.text.len() as u64,
                n_tokens: req.tokens.len() as u32,
                ctx_size,
                reason: req.reason,
                identity: self.cfg.identity,
                created_at: meta.created_at,
                file_bytes,
                hits: 0,
                last_used: 0,
                file_id: file_id(&md),
            },
        );
        inner.stats.n_written += 1;
        self.bump_generation_locked(&mut inner)?;
        Ok(SaveOutcome::Written {
            key,
            file_bytes,
            n_evicted,
        })
    }

    /// Removes the entry `key` (e.g. a consumed checkpoint once its successor is durable).
    pub fn remove(&self, key: &Key) -> Result<bool> {
        let mut inner = self.lock_inner();
        let _dir = DirLock::exclusive(&self.lock_file)?;
        let existed = match fs::remove_file(self.entry_path(key)) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e.into()),
        };
        let _ = fs::remove_file(self.meta_path(key));
        inner.entries.remove(key);
        if existed {
            self.bump_generation_locked(&mut inner)?;
        }
        Ok(existed)
    }

    /// Bytes of all cache files now in the directory (temp files included).
    pub fn usage_bytes(&self) -> Result<u64> {
        let mut inner = self.lock_inner();
        let _dir = DirLock::exclusive(&self.lock_file)?;
        self.dir_usage_locked(&mut inner)
    }
}

/// Reads a sidecar: `(hits, last_used)`, zeros if missing or invalid.
fn read_meta(path: &Path) -> (u32, u64) {
    let Ok(b) = fs::read(path) else {
        return (0, 0);
    };
    if b.len() != META_BYTES as usize
        || b[..8] != META_MAGIC
        || crc32fast::hash(&b[..28]).to_le_bytes() != b[28..32]
    {
        return (0, 0);
    }
    let mut h = [0u8; 4];
    h.copy_from_slice(&b[8..12]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&b[16..24]);
    (u32::from_le_bytes(h), u64::from_le_bytes(t))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha1_known_vector() {
        // ds4_server.c's unit test vector.
        assert_eq!(
            key_hex(&key_of(b"abc")),
            "a9993e364706816aba3e25717850c26c9cd0d89d"
        );
    }

    #[test]
    fn names() {
        let k = key_of(b"x");
        let hex = key_hex(&k);
        assert_eq!(classify(&format!("{hex}.rkv")), FileKind::Entry(k));
        assert_eq!(classify(&format!("{hex}.meta")), FileKind::Meta(k));
        assert_eq!(
            classify(&format!("{hex}.rkv.tmp.12.3")),
            FileKind::EntryTemp
        );
        assert_eq!(
            classify(&format!("{hex}.meta.tmp.12.3")),
            FileKind::MetaTemp
        );
        assert_eq!(classify(".lock"), FileKind::Lock);
        assert_eq!(classify(&format!("{hex}.kv")), FileKind::Other);
        assert_eq!(classify("README"), FileKind::Other);
        assert_eq!(
            classify("ééééééééééééééééééééééééééééééé.rkv"),
            FileKind::Other
        );
        assert_eq!(parse_hex_key(&hex.to_uppercase()), Some(k));
    }
}
