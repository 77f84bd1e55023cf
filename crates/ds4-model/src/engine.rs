//! [`Engine`]: a model together with its tokenizer and display name, loaded in one call.
//!
//! [`crate::Model`] only knows weights and token ids; the CLI and the server also need
//! text. `Engine` bundles the two:
//! - a `.gguf` file: the tokenizer is built from its `tokenizer.ggml.*` metadata
//!   (PROMPT.md §1.2) when present, the name from `general.name`;
//! - a Hugging Face checkpoint directory: the tokenizer from `tokenizer.json` in it when
//!   present, the name from the directory;
//! - the embedded demo ([`Engine::demo`], see [`crate::demo`]).
//!
//! A model without a tokenizer still loads (diagnostics feed token ids); asking it for
//! text ([`Engine::tokenizer`]) is then a clear [`Error::NoTokenizer`].
//! [`load_tokenizer`] reads only the tokenizer (for `ds4 --dump-tokens`, which must not
//! load weights).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ds4_tensor::gguf::GgufFile;

use crate::error::{Error, Result};
use crate::session::{LoadOptions, Model};
use crate::tokenizer::{Tokenizer, check_gguf_kind};

/// Where an engine's model came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// The embedded demo model (random weights).
    Demo,
    /// A file or directory.
    Path(PathBuf),
}

/// A loaded model, its tokenizer (if it has one) and its display name.
#[derive(Debug)]
pub struct Engine {
    /// The model.
    pub model: Model,
    tokenizer: Option<Arc<Tokenizer>>,
    /// Display name: `general.name` of a GGUF, the directory name of a checkpoint, or
    /// [`crate::demo::NAME`].
    pub name: String,
    /// Where the model came from.
    pub source: ModelSource,
}

impl Engine {
    /// Loads a `.gguf` file or a checkpoint directory with its tokenizer.
    pub fn load(path: &Path, opts: &LoadOptions) -> Result<Engine> {
        let (tokenizer, name) = read_tokenizer_and_name(path)?;
        let model = Model::load(path, opts)?;
        Ok(Engine {
            model,
            tokenizer: tokenizer.map(Arc::new),
            name,
            source: ModelSource::Path(path.to_path_buf()),
        })
    }

    /// The embedded demo model ([`crate::demo`]) with the real V4 tokenizer.
    pub fn demo(opts: &LoadOptions) -> Result<Engine> {
        // The two halves take similar time on first use: build them side by side.
        let (model, tokenizer) = rayon::join(|| crate::demo::model(opts), crate::demo::tokenizer);
        Ok(Engine {
            model: model?,
            tokenizer: Some(tokenizer?),
            name: crate::demo::NAME.to_string(),
            source: ModelSource::Demo,
        })
    }

    /// An engine from parts (tests, embedders).
    pub fn from_parts(model: Model, tokenizer: Option<Arc<Tokenizer>>, name: String) -> Engine {
        Engine {
            model,
            tokenizer,
            name,
            source: ModelSource::Demo,
        }
    }

    /// The tokenizer, or [`Error::NoTokenizer`] when the model has none.
    pub fn tokenizer(&self) -> Result<&Arc<Tokenizer>> {
        self.tokenizer.as_ref().ok_or_else(|| Error::NoTokenizer {
            model: self.name.clone(),
        })
    }

    /// Whether a tokenizer is available.
    pub fn has_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }
}

/// Reads only the tokenizer of a `.gguf` file or checkpoint directory (no weights);
/// [`Error::NoTokenizer`] when there is none.
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    read_tokenizer_and_name(path)?
        .0
        .ok_or_else(|| Error::NoTokenizer {
            model: path.display().to_string(),
        })
}

fn read_tokenizer_and_name(path: &Path) -> Result<(Option<Tokenizer>, String)> {
    let fallback_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string());
    if path.is_dir() {
        let tj = path.join("tokenizer.json");
        let tok = if tj.is_file() {
            Some(Tokenizer::from_tokenizer_json(&std::fs::read(&tj)?)?)
        } else {
            None
        };
        return Ok((tok, fallback_name));
    }
    let file = GgufFile::open(path)?;
    let name = file
        .get_str("general.name")
        .map(str::to_string)
        .unwrap_or(fallback_name);
    if file.get("tokenizer.ggml.tokens").is_none() {
        return Ok((None, name));
    }
    let kind = file.get_str("tokenizer.ggml.model")?;
    check_gguf_kind(kind, file.get_str("tokenizer.ggml.pre").ok())?;
    let tokens = file
        .get_str_array("tokenizer.ggml.tokens")?
        .into_iter()
        .map(str::to_string)
        .collect();
    let merges = file
        .get_str_array("tokenizer.ggml.merges")?
        .into_iter()
        .map(str::to_string)
        .collect();
    let types = file.get_i32_array("tokenizer.ggml.token_type")?;
    Ok((
        Some(Tokenizer::from_gguf_parts(tokens, merges, types)?),
        name,
    ))
}
