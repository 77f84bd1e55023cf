//! Weight-upload progress for GPU backends: a byte progress bar on a terminal, otherwise a
//! line every 10% on stderr (logs of the benchmark script stay readable).

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use ds4_model::device::UploadProgress;

/// A progress callback for [`ds4_model::LoadOptions::upload_progress`].
pub fn upload_progress() -> UploadProgress {
    if std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "uploading weights {bar:40} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        UploadProgress(Arc::new(move |done, total| {
            bar.set_length(total);
            bar.set_position(done);
            if done >= total {
                bar.finish_and_clear();
            }
        }))
    } else {
        let last = Mutex::new(u64::MAX);
        UploadProgress(Arc::new(move |done, total| {
            let tenth = (done * 10).checked_div(total).unwrap_or(10);
            let mut l = last.lock().unwrap_or_else(|p| p.into_inner());
            if *l != tenth {
                *l = tenth;
                eprintln!(
                    "ds4: uploading weights to the GPU: {:.2} / {:.2} GiB",
                    done as f64 / (1u64 << 30) as f64,
                    total as f64 / (1u64 << 30) as f64
                );
            }
        }))
    }
}
