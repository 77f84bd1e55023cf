//! The disk KV cache command-line flags, shared by `ds4` and `ds4-server` (feature `cli`).
//!
//! Both binaries `#[command(flatten)]` [`KvCacheArgs`], so `--kv-disk-dir`,
//! `--kv-disk-space-mb` and the `--kv-cache-*` policy knobs have one set of names, defaults,
//! value ranges and help texts (ds4-server's, KVCACHE.md s10), and one conversion into
//! [`DiskCacheConfig`]. Clap stays out of the library unless a binary asks for the feature.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::manager::DiskCacheConfig;
use crate::policy::Policy;

/// `--kv-disk-dir`, `--kv-disk-space-mb` and the `--kv-cache-*` policy knobs.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Disk KV cache")]
pub struct KvCacheArgs {
    /// Save prompt states (KV cache checkpoints) in DIR and restore the longest saved
    /// prefix of later prompts from it, also after a restart: a long prompt seen before
    /// costs a file read instead of a prefill. Off when unset. The live session is also
    /// saved before an unrelated conversation replaces it and at a clean exit. Files are
    /// checksummed and tagged with the model; a file of another model is never used.
    #[arg(long = "kv-disk-dir", value_name = "DIR")]
    pub kv_disk_dir: Option<PathBuf>,
    /// Space budget of --kv-disk-dir in MiB: a hard cap, the least useful checkpoints are
    /// evicted (score: tokens saved per byte, weighted by recent hits).
    #[arg(long = "kv-disk-space-mb", value_name = "N", default_value_t = 4096,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_disk_space_mb: u64,
    /// Never save or restore checkpoints shorter than N tokens.
    #[arg(long = "kv-cache-min-tokens", value_name = "N", default_value_t = 512,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub kv_cache_min_tokens: u64,
    /// Cold save: after the first prefill of a prompt with no cached prefix, store its
    /// stable part (up to the last user turn, or the prompt minus the trim, aligned) when
    /// the prompt has at most N tokens; 0 disables, else N >= --kv-cache-min-tokens.
    /// Restored checkpoints longer than N are deleted once a longer checkpoint of the same
    /// conversation is on disk.
    #[arg(
        long = "kv-cache-cold-max-tokens",
        value_name = "N",
        default_value_t = 30000
    )]
    pub kv_cache_cold_max_tokens: u64,
    /// Continued saves: a checkpoint every ~N tokens of a long prompt or answer, at absolute
    /// positions rounded up to the alignment (10000 -> every 10240); 0 disables.
    #[arg(
        long = "kv-cache-continued-interval-tokens",
        value_name = "N",
        default_value_t = 10000
    )]
    pub kv_cache_continued_interval_tokens: u64,
    /// Tokens left out at the end of cold saves (the tail whose tokenization may change when
    /// text is appended).
    #[arg(
        long = "kv-cache-boundary-trim-tokens",
        value_name = "N",
        default_value_t = 32
    )]
    pub kv_cache_boundary_trim_tokens: u64,
    /// Cold and continued checkpoint lengths are multiples of N (0: no alignment).
    #[arg(
        long = "kv-cache-boundary-align-tokens",
        value_name = "N",
        default_value_t = 2048
    )]
    pub kv_cache_boundary_align_tokens: u64,
    /// Only restore checkpoints written with the same weight types (by default a checkpoint
    /// of the 2-bit model is used by the 4-bit one and vice versa, as in ds4).
    #[arg(long = "kv-cache-reject-different-quant")]
    pub kv_cache_reject_different_quant: bool,
}

impl KvCacheArgs {
    /// The save policy of the `--kv-cache-*` flags, validated ([`Policy::validate`]).
    pub fn policy(&self) -> Result<Policy> {
        let policy = Policy {
            min_tokens: tokens("--kv-cache-min-tokens", self.kv_cache_min_tokens)?,
            cold_max_tokens: tokens("--kv-cache-cold-max-tokens", self.kv_cache_cold_max_tokens)?,
            continued_interval_tokens: tokens(
                "--kv-cache-continued-interval-tokens",
                self.kv_cache_continued_interval_tokens,
            )?,
            boundary_trim_tokens: tokens(
                "--kv-cache-boundary-trim-tokens",
                self.kv_cache_boundary_trim_tokens,
            )?,
            boundary_align_tokens: tokens(
                "--kv-cache-boundary-align-tokens",
                self.kv_cache_boundary_align_tokens,
            )?,
            reject_different_quant: self.kv_cache_reject_different_quant,
        };
        policy.validate().map_err(|e| Error::Invalid {
            reason: format!("--kv-cache-*: {e}"),
        })?;
        Ok(policy)
    }

    /// The cache configuration, or `None` without `--kv-disk-dir`. Checks again what clap
    /// checks (a budget of at least 1 MiB, `--kv-cache-min-tokens` >= 1), for values set in
    /// code, plus the policy's cross-field rules. Without `--kv-disk-dir` the knobs are
    /// unused and not checked, as in ds4-server.
    pub fn config(&self) -> Result<Option<DiskCacheConfig>> {
        let Some(dir) = &self.kv_disk_dir else {
            return Ok(None);
        };
        if self.kv_disk_space_mb == 0 {
            return Err(Error::Invalid {
                reason: "--kv-disk-space-mb must be at least 1 (MiB)".into(),
            });
        }
        Ok(Some(DiskCacheConfig {
            space_mb: self.kv_disk_space_mb,
            policy: self.policy()?,
            ..DiskCacheConfig::new(dir.clone())
        }))
    }
}

/// A token count flag as `usize` (only fails where `usize` is narrower than 64 bits).
fn tokens(flag: &str, n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| Error::Invalid {
        reason: format!("{flag} {n} is too large for this platform"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A binary's parser with the flags flattened in, as `ds4` and `ds4-server` have it.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        kv: KvCacheArgs,
    }

    fn parse(flags: &[&str]) -> std::result::Result<KvCacheArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("bin").chain(flags.iter().copied())).map(|c| c.kv)
    }

    #[test]
    fn defaults_are_the_policy_and_config_defaults() {
        let kv = parse(&[]).expect("no flags parse");
        assert_eq!(kv.kv_disk_dir, None);
        assert!(!kv.kv_cache_reject_different_quant);
        assert!(kv.config().expect("defaults are valid").is_none());
        // The flag defaults are the library's: DiskCacheConfig::new and Policy::default.
        let want = DiskCacheConfig::new("kv");
        assert_eq!(kv.kv_disk_space_mb, want.space_mb);
        assert_eq!(kv.policy().expect("valid"), want.policy);

        let kv = parse(&["--kv-disk-dir", "kv"]).expect("parses");
        let cfg = kv.config().expect("valid").expect("cache on");
        assert_eq!(cfg.dir, PathBuf::from("kv"));
        assert_eq!(cfg.space_mb, want.space_mb);
        assert_eq!(cfg.policy, want.policy);
        assert_eq!(cfg.fsync, want.fsync);
    }

    #[test]
    fn zero_budget_and_zero_min_tokens_are_rejected() {
        for flag in ["--kv-disk-space-mb", "--kv-cache-min-tokens"] {
            let err = parse(&["--kv-disk-dir", "kv", flag, "0"]).expect_err(flag);
            assert_eq!(
                err.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{flag}"
            );
            assert!(err.to_string().contains(flag), "{flag}: {err}");
            parse(&["--kv-disk-dir", "kv", flag, "1"]).expect("1 is accepted");
        }
        // Set in code, past clap: the conversion rejects them too.
        let mut kv = parse(&["--kv-disk-dir", "kv"]).expect("parses");
        kv.kv_disk_space_mb = 0;
        let err = kv.config().expect_err("0 MiB");
        assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains("--kv-disk-space-mb"), "{err}");
        let mut kv = parse(&["--kv-disk-dir", "kv"]).expect("parses");
        kv.kv_cache_min_tokens = 0;
        assert!(matches!(kv.config(), Err(Error::Invalid { .. })));
    }

    #[test]
    fn every_flag_reaches_the_config() {
        let kv = parse(&[
            "--kv-disk-dir",
            "/tmp/cache",
            "--kv-disk-space-mb",
            "7",
            "--kv-cache-min-tokens",
            "32",
            "--kv-cache-cold-max-tokens",
            "0",
            "--kv-cache-continued-interval-tokens",
            "64",
            "--kv-cache-boundary-trim-tokens",
            "3",
            "--kv-cache-boundary-align-tokens",
            "16",
            "--kv-cache-reject-different-quant",
        ])
        .expect("parses");
        let cfg = kv.config().expect("valid").expect("cache on");
        assert_eq!(cfg.dir, PathBuf::from("/tmp/cache"));
        assert_eq!(cfg.space_mb, 7);
        assert_eq!(
            cfg.policy,
            Policy {
                min_tokens: 32,
                cold_max_tokens: 0,
                continued_interval_tokens: 64,
                boundary_trim_tokens: 3,
                boundary_align_tokens: 16,
                reject_different_quant: true,
            }
        );
        assert!(cfg.fsync);
    }

    #[test]
    fn policy_rules_are_checked_when_the_cache_is_on() {
        let bad = [
            "--kv-cache-min-tokens",
            "600",
            "--kv-cache-cold-max-tokens",
            "100",
        ];
        // clap accepts each value alone; the cross-field rule is the conversion's.
        let kv = parse(&bad).expect("parses");
        let err = kv.policy().expect_err("cold max below min");
        assert!(err.to_string().contains("--kv-cache-*"), "{err}");
        // Unused without --kv-disk-dir, so not an error there (scripts keep working).
        assert!(kv.config().expect("cache off").is_none());
        let mut flags = vec!["--kv-disk-dir", "kv"];
        flags.extend(bad);
        let err = parse(&flags)
            .expect("parses")
            .config()
            .expect_err("cache on");
        assert!(matches!(err, Error::Invalid { .. }), "{err:?}");
        assert!(err.to_string().contains("--kv-cache-*"), "{err}");
    }

    #[test]
    fn help_lists_every_flag_under_one_heading() {
        use clap::CommandFactory;
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Disk KV cache:"), "{help}");
        for flag in [
            "--kv-disk-dir <DIR>",
            "--kv-disk-space-mb <N>",
            "--kv-cache-min-tokens <N>",
            "--kv-cache-cold-max-tokens <N>",
            "--kv-cache-continued-interval-tokens <N>",
            "--kv-cache-boundary-trim-tokens <N>",
            "--kv-cache-boundary-align-tokens <N>",
            "--kv-cache-reject-different-quant",
        ] {
            assert!(help.contains(flag), "{flag} missing:\n{help}");
        }
    }
}
