//! `cairn`: list, inspect, verify, diff, copy, prune, report, export and import checkpoints
//! on any store the library opens. Data goes to stdout, messages and progress to stderr. Exit
//! status: 0 all well, 1 problems found (corrupt data, differences, nothing to show),
//! 2 error.

mod commands;
mod output;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use output::CliError;

const EXAMPLES: &str = "\
Examples:
  cairn ls runs/job                       list committed checkpoints
  cairn latest s3://bucket/job            URI of the newest one (exit 1 if none)
  cairn inspect runs/job/step-000000001000 --json
  cairn verify runs/job                   check every byte of every checkpoint
  cairn diff runs/a/step-000000000100 runs/b/step-000000000100
  cairn cp runs/job s3://bucket/job       copy a run (or one checkpoint), verified
  cairn prune runs/job --keep-last 3 --keep-every 10000 --dry-run
  cairn export runs/job model.safetensors --prefix model. --dtype bf16
  cairn import hf-model/ runs/finetune --step 0
  cairn report runs/job -o report.html --keep-last 3   the run's history as one HTML page";

/// Inspect, verify and move Cairn checkpoints.
#[derive(Parser)]
#[command(name = "cairn", version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the committed checkpoints of a run: step, created, size, temporary, metrics.
    Ls {
        /// Run directory or URI.
        run: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the URI of the latest committed checkpoint (exit 1 if there is none).
    Latest {
        /// Run directory or URI.
        run: String,
    },
    /// Show tensors (dtype, shape, size, shard), metadata and totals per top-level key.
    Inspect {
        /// Checkpoint folder, or a run (its latest checkpoint).
        ckpt: String,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Read every byte and check every checksum of a checkpoint or of every checkpoint of a run.
    Verify {
        /// Checkpoint folder or run.
        target: String,
    },
    /// Compare two checkpoints key by key (exit 1 when they differ).
    Diff {
        /// First checkpoint (or run: its latest).
        a: String,
        /// Second checkpoint (or run: its latest).
        b: String,
    },
    /// Copy a checkpoint or a whole run between stores, verified; re-run to resume.
    Cp {
        /// Source checkpoint or run.
        src: String,
        /// Destination.
        dst: String,
    },
    /// Apply retention to a run and remove what unfinished saves left behind.
    Prune {
        /// Run directory or URI.
        run: String,
        #[command(flatten)]
        keep: KeepFlags,
        /// Leftovers of unfinished saves younger than this are kept (a save may be running).
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        grace: std::time::Duration,
        /// Only print what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write the run's history as one self-contained HTML page: checkpoints on a timeline,
    /// metrics, sizes and bytes written, save stall and write time, retention's verdict.
    Report {
        /// Run directory or URI (with a two-tier manager, its durable tier).
        run: String,
        /// The HTML file to write.
        #[arg(short, long, default_value = "report.html")]
        out: PathBuf,
        /// The local tier's run, shown beside the durable one.
        #[arg(long)]
        local: Option<String>,
        /// Retention rules whose verdict the page shows (none: no verdict).
        #[command(flatten)]
        keep: KeepFlags,
    },
    /// Write one plain safetensors file (for inference and the Hugging Face ecosystem).
    Export {
        /// Checkpoint folder, or a run (its latest checkpoint).
        ckpt: String,
        /// Output .safetensors file, or with --max-shard-size a Hugging Face folder.
        out: PathBuf,
        /// Only keys starting with this (repeatable).
        #[arg(long)]
        prefix: Vec<String>,
        /// Drop the --prefix from the exported keys (`model.` of a training state).
        #[arg(long, requires = "prefix")]
        strip_prefix: bool,
        /// Convert floating-point tensors to this dtype (f32, f16, bf16, f64, fp8 = fp8_e4m3,
        /// fp8_e5m2).
        #[arg(long)]
        dtype: Option<String>,
        /// Write a Hugging Face sharded folder (model-0000i-of-0000n.safetensors and
        /// model.safetensors.index.json, or model.safetensors when one shard holds it all)
        /// with shards of at most this size: 5GB, 500MiB, ...
        #[arg(long, value_parser = commands::convert::parse_size)]
        max_shard_size: Option<u64>,
    },
    /// Import a safetensors file or a Hugging Face sharded folder as a checkpoint.
    Import {
        /// A .safetensors file, or a folder with model.safetensors.index.json or model.safetensors.
        src: PathBuf,
        /// Run directory or URI to save into.
        run: String,
        /// Step of the new checkpoint.
        #[arg(long)]
        step: u64,
    },
}

/// Retention rules, as `cairn prune` applies them and `cairn report` shows them.
#[derive(clap::Args)]
struct KeepFlags {
    /// Keep the last N permanent checkpoints.
    #[arg(long)]
    keep_last: Option<usize>,
    /// Keep every checkpoint whose step is a multiple of K.
    #[arg(long)]
    keep_every: Option<u64>,
    /// Keep the best K by --metric.
    #[arg(long, requires = "metric")]
    keep_best: Option<usize>,
    /// Metric ranked by --keep-best.
    #[arg(long)]
    metric: Option<String>,
    /// Whether lower or higher --metric is better.
    #[arg(long, default_value = "min", value_parser = ["min", "max"])]
    mode: String,
}

impl KeepFlags {
    /// Whether any rule was given.
    fn given(&self) -> bool {
        self.keep_last.is_some() || self.keep_every.is_some() || self.keep_best.is_some()
    }

    /// The rules as the library takes them.
    fn retention(self) -> Result<cairn::policy::Retention, CliError> {
        let mode = self.mode.parse()?;
        Ok(cairn::policy::Retention::from_flags(self.keep_last, self.keep_every, self.keep_best, self.metric, mode)?)
    }
}

fn main() -> ExitCode {
    // Like other Unix tools, end quietly when the reader of our output goes away
    // (`cairn ls RUN | head`) instead of failing on a broken pipe.
    // SAFETY: setting a signal disposition to its default before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Ls { run, json } => commands::list::ls(&run, json),
        Command::Latest { run } => commands::list::latest(&run),
        Command::Inspect { ckpt, json } => commands::inspect::run(&ckpt, json),
        Command::Verify { target } => commands::verify::run(&target),
        Command::Diff { a, b } => commands::diff::run(&a, &b),
        Command::Cp { src, dst } => commands::copy::run(&src, &dst),
        Command::Prune { run, keep, grace, dry_run } => {
            keep.retention().and_then(|retention| commands::prune::run(&run, &retention, grace, dry_run))
        }
        Command::Report { run, out, local, keep } => {
            let given = keep.given();
            keep.retention().and_then(|retention| {
                commands::report::run(commands::report::Report {
                    run: &run,
                    local: local.as_deref(),
                    retention: given.then_some(retention),
                    out: &out,
                })
            })
        }
        Command::Export { ckpt, out, prefix, strip_prefix, dtype, max_shard_size } => {
            commands::convert::export(commands::convert::Export {
                uri: &ckpt,
                out: &out,
                prefixes: prefix,
                strip_prefix,
                dtype: dtype.as_deref(),
                max_shard_bytes: max_shard_size,
            })
        }
        Command::Import { src, run, step } => commands::convert::import(&src, &run, step),
    };
    match result {
        Ok(status) => status,
        Err(err) => {
            err.print();
            ExitCode::from(2)
        }
    }
}

/// What a command returns: its exit status, or an error (exit 2).
pub type CommandResult = Result<ExitCode, CliError>;
