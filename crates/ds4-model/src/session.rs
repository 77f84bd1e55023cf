//! The public engine boundary: [`Model`] (load once) and [`Session`] (one sequence's state).

use std::path::Path;
use std::sync::Arc;

use ds4_tensor::backend::{Backend, Device};

use crate::checkpoint::Checkpoint;
use crate::config::Config;
use crate::device::UploadProgress;
use crate::error::{Error, Result};
use crate::forward::Graph;
use crate::numerics::{RopeKind, rope_freqs_for};
use crate::state::LayerState;
use crate::weights::Weights;

/// Options of [`Model::load`].
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Simulate the FP8 (E4M3) round trip of stored KV rows and the indexer's Hadamard + FP4
    /// step, as the model was trained and as the official code runs it (MODEL.md D1/D2).
    /// On by default; turn it off to compare with transformers or llama.cpp, which do not
    /// simulate. Shapes that cannot be simulated (see [`Config::supports_qat_sim`]) fail to
    /// load with it on.
    pub qat_sim: bool,
    /// Largest number of tokens [`Session::feed`] processes in one batched step.
    pub prefill_chunk: usize,
    /// The compute backend ([`crate::device`]): the CPU (default) or CUDA device 0.
    pub device: Device,
    /// Called during a GPU backend's weight upload with `(done_bytes, total_bytes)`.
    pub upload_progress: Option<UploadProgress>,
}

impl Default for LoadOptions {
    fn default() -> LoadOptions {
        LoadOptions {
            qat_sim: true,
            prefill_chunk: 256,
            device: Device::Cpu,
            upload_progress: None,
        }
    }
}

/// A loaded model: config, weights (memory-mapped where possible) and a backend.
#[derive(Debug)]
pub struct Model {
    cfg: Config,
    weights: Weights,
    backend: Arc<dyn Backend>,
    freqs_main: Vec<f32>,
    freqs_comp: Vec<f32>,
    opts: LoadOptions,
}

impl Model {
    /// Loads a `.gguf` file or a Hugging Face checkpoint directory (`config.json` +
    /// `*.safetensors`), on the backend `opts.device` names.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Model> {
        let load_err = |what: String| Error::Load {
            path: path.display().to_string(),
            what,
        };
        let (mut cfg, weights) = if path.is_dir() {
            let text = std::fs::read_to_string(path.join("config.json"))
                .map_err(|e| load_err(format!("config.json: {e}")))?;
            let mut cfg = Config::from_hf_json(&text)?;
            cfg.validate()?;
            let ck = Checkpoint::open(path)?;
            let w = Weights::bind(&cfg, &ck)?;
            (cfg, w)
        } else {
            crate::gguf::load(path)?
        };
        cfg.validate()?;
        let backend = crate::device::backend_for(opts, &weights)?;
        Model::from_parts(cfg, weights, backend, opts)
    }

    /// Builds a model from an already validated config and bound weights.
    pub fn from_parts(
        cfg: Config,
        weights: Weights,
        backend: Arc<dyn Backend>,
        opts: &LoadOptions,
    ) -> Result<Model> {
        if opts.qat_sim && !cfg.supports_qat_sim() {
            return Err(crate::error::config_err(
                "qat_sim",
                format!(
                    "the indexer's Hadamard needs a power-of-two indexer_head_dim (got {}); load with qat_sim off",
                    cfg.indexer_head_dim
                ),
            ));
        }
        if opts.prefill_chunk == 0 {
            return Err(crate::error::config_err(
                "prefill_chunk",
                "must be positive",
            ));
        }
        Ok(Model {
            freqs_main: rope_freqs_for(&cfg, RopeKind::Main),
            freqs_comp: rope_freqs_for(&cfg, RopeKind::Comp),
            cfg,
            weights,
            backend,
            opts: opts.clone(),
        })
    }

    /// The model shape.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The bound weights.
    pub fn weights(&self) -> &Weights {
        &self.weights
    }

    /// The options the model was loaded with.
    pub fn options(&self) -> &LoadOptions {
        &self.opts
    }

    fn graph(&self) -> Graph<'_> {
        Graph {
            cfg: &self.cfg,
            w: &self.weights,
            be: self.backend.as_ref(),
            freqs_main: &self.freqs_main,
            freqs_comp: &self.freqs_comp,
            qat_sim: self.opts.qat_sim,
        }
    }
}

/// The complete decoding state of a session; [`Session::snapshot`] / [`Session::restore`].
#[derive(Debug, Clone, PartialEq)]
pub struct SessionState {
    /// Tokens evaluated so far.
    pub tokens: Vec<u32>,
    /// Per-layer caches.
    pub layers: Vec<LayerState>,
    /// Next-token logits after the last token (empty before the first).
    pub logits: Vec<f32>,
}

/// One sequence being evaluated: its caches and last logits.
#[derive(Debug)]
pub struct Session<'m> {
    model: &'m Model,
    n_ctx: usize,
    st: SessionState,
}

impl<'m> Session<'m> {
    /// A new, empty session holding at most `n_ctx` tokens.
    pub fn new(model: &'m Model, n_ctx: usize) -> Session<'m> {
        let c = &model.cfg;
        let layers = (0..c.n_layer)
            .map(|il| {
                LayerState::new(
                    c.compress_ratio(il),
                    c.sliding_window,
                    c.head_dim,
                    c.indexer_head_dim,
                )
            })
            .collect();
        Session {
            model,
            n_ctx,
            st: SessionState {
                tokens: Vec::new(),
                layers,
                logits: Vec::new(),
            },
        }
    }

    /// The context size (most tokens this session holds).
    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The model this session evaluates.
    pub fn model(&self) -> &'m Model {
        self.model
    }

    /// Forgets every evaluated token: back to the state of [`Session::new`].
    pub fn reset(&mut self) {
        *self = Session::new(self.model, self.n_ctx);
    }

    /// Number of tokens evaluated so far (the next token's position).
    pub fn n_past(&self) -> usize {
        self.st.tokens.len()
    }

    /// The tokens evaluated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.st.tokens
    }

    /// Evaluates `tokens` (chunked prefill, or one decode step); [`Session::logits`] then
    /// holds the next-token logits after the last of them.
    pub fn feed(&mut self, tokens: &[u32]) -> Result<()> {
        self.feed_inner(tokens, false).map(|_| ())
    }

    /// Like [`Session::feed`], and returns the logits after every one of `tokens`,
    /// `[tokens.len(), n_vocab]` row-major.
    pub fn feed_all_logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.feed_inner(tokens, true)
    }

    fn feed_inner(&mut self, tokens: &[u32], all: bool) -> Result<Vec<f32>> {
        if self.n_past() + tokens.len() > self.n_ctx {
            return Err(Error::ContextFull {
                n_past: self.n_past(),
                n_new: tokens.len(),
                n_ctx: self.n_ctx,
            });
        }
        // Validate up front so that a bad id never leaves a half-evaluated chunk behind.
        let n_vocab = self.model.cfg.n_vocab;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(Error::TokenOutOfRange { token, n_vocab });
        }
        let graph = self.model.graph();
        let mut out = Vec::new();
        for chunk in tokens.chunks(self.model.opts.prefill_chunk) {
            let n_out = if all { chunk.len() } else { 1 };
            // On error the state may hold part of the chunk: restore from a snapshot to retry.
            let pos0 = self.n_past();
            let logits = graph.eval(&mut self.st.layers, chunk, pos0, n_out)?;
            self.st.tokens.extend_from_slice(chunk);
            let v = self.model.cfg.n_vocab;
            self.st.logits = logits[logits.len() - v..].to_vec();
            if all {
                out.extend_from_slice(&logits);
            }
        }
        Ok(out)
    }

    /// Next-token logits after the last evaluated token.
    pub fn logits(&self) -> Result<&[f32]> {
        if self.st.logits.is_empty() {
            Err(Error::NoLogits)
        } else {
            Ok(&self.st.logits)
        }
    }

    /// A copy of the whole decoding state.
    pub fn snapshot(&self) -> SessionState {
        self.st.clone()
    }

    /// Returns to a state taken with [`Session::snapshot`] (of a session of the same model).
    pub fn restore(&mut self, state: &SessionState) {
        self.st = state.clone();
    }

    /// Like [`Session::restore`], taking the state by value (no copy; the disk KV cache
    /// hands over a freshly loaded state).
    pub fn restore_owned(&mut self, state: SessionState) {
        self.st = state;
    }
}
