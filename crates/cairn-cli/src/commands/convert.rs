//! `cairn export` (one plain safetensors file, or a Hugging Face sharded folder) and
//! `cairn import` (a safetensors file or a Hugging Face sharded folder into a checkpoint).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bytes::Bytes;
use cairn::{DType, LoadOptions, SaveOptions, State, Tensor};

use crate::output::{self, CliError};
use crate::CommandResult;

/// A tensor as the safetensors serializer sees it.
struct View<'a>(&'a Tensor, Vec<usize>);

impl safetensors::View for View<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.0.dtype().to_safetensors()
    }
    fn shape(&self) -> &[usize] {
        &self.1
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.0.data())
    }
    fn data_len(&self) -> usize {
        self.0.data().len()
    }
}

/// What `cairn export` writes and how.
pub struct Export<'a> {
    /// Checkpoint folder or run (its latest checkpoint).
    pub uri: &'a str,
    /// The safetensors file, or with `max_shard_bytes` the Hugging Face folder.
    pub out: &'a Path,
    /// Only keys starting with one of these.
    pub prefixes: Vec<String>,
    /// Drop the matching prefix from each key (`model.` of a training state).
    pub strip_prefix: bool,
    /// Floating-point tensors converted to this dtype.
    pub dtype: Option<&'a str>,
    /// Write a Hugging Face sharded folder with shards of at most this many bytes.
    pub max_shard_bytes: Option<u64>,
}

pub fn export(job: Export<'_>) -> CommandResult {
    let target = job.dtype.map(|d| DType::from_name(&normalize(d))).transpose()?;
    let ckpt = cairn::open(job.uri)?;
    let state = ckpt.load(&LoadOptions { prefixes: job.prefixes.clone(), ..Default::default() })?;
    let mut tensors = BTreeMap::new();
    for (key, t) in state.tensors() {
        let t = match target {
            Some(to) if t.to_f64s().is_some() => t.cast(to)?,
            _ => t.clone(),
        };
        let name = match job.prefixes.iter().find(|p| job.strip_prefix && key.starts_with(p.as_str())) {
            Some(prefix) => key[prefix.len()..].to_string(),
            None => key.clone(),
        };
        if name.is_empty() {
            return Err(CliError::msg(format!("key=`{key}` is empty once its prefix is stripped")));
        }
        if tensors.insert(name.clone(), t).is_some() {
            return Err(CliError::msg(format!("two keys become key=`{name}` once their prefix is stripped")));
        }
    }
    if tensors.contains_key("__metadata__") {
        return Err(CliError::msg("a tensor named `__metadata__` cannot be exported to safetensors"));
    }
    let bytes: u64 = tensors.values().map(|t| t.data().len() as u64).sum();
    let bar = output::progress(bytes, "writing");
    let files = match job.max_shard_bytes {
        None => {
            write_file(&tensors, tensors.keys(), job.out)?;
            1
        }
        Some(limit) => write_sharded(&tensors, limit, job.out, &|n| bar.inc(n))?,
    };
    bar.finish_and_clear();
    println!(
        "exported {} tensors ({}) from step {} to {}{}",
        tensors.len(),
        output::size(bytes),
        ckpt.info().step,
        job.out.display(),
        if files > 1 { format!(" ({files} shards)") } else { String::new() }
    );
    Ok(ExitCode::SUCCESS)
}

/// Writes the `keys` of `tensors` as one safetensors file `out`, readable by all (0644).
fn write_file<'a>(
    tensors: &BTreeMap<String, Tensor>,
    keys: impl Iterator<Item = &'a String>,
    out: &Path,
) -> Result<(), CliError> {
    let views: Vec<(String, View)> = keys
        .map(|k| {
            let t = &tensors[k];
            (k.clone(), View(t, t.shape().iter().map(|&d| d as usize).collect()))
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), out)
        .map_err(|e| CliError::msg(format!("cannot write file=`{}`: {e}", out.display())))?;
    // safetensors writes through a private temporary file (mode 0600): an exported model
    // is for others to read, like any file the user writes.
    std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(|e| CliError::msg(format!("cannot set the mode of file=`{}`: {e}", out.display())))
}

/// Writes a Hugging Face folder `out`: `model.safetensors` when everything fits in one
/// shard of `limit` bytes, else `model-0000i-of-0000n.safetensors` shards filled in key
/// order (a tensor larger than `limit` alone in its shard) and
/// `model.safetensors.index.json`, written last. Returns the number of files.
fn write_sharded(
    tensors: &BTreeMap<String, Tensor>,
    limit: u64,
    out: &Path,
    written: &dyn Fn(u64),
) -> Result<usize, CliError> {
    std::fs::create_dir_all(out).map_err(|e| CliError::msg(format!("cannot create dir=`{}`: {e}", out.display())))?;
    // Files of an earlier export would mix in (a stale model.safetensors wins over a new
    // index in from_pretrained): only an empty folder is written into.
    let mut entries =
        std::fs::read_dir(out).map_err(|e| CliError::msg(format!("cannot read dir=`{}`: {e}", out.display())))?;
    if entries.next().is_some() {
        return Err(CliError::msg(format!(
            "dir=`{}` is not empty: export a Hugging Face folder into a new or empty one",
            out.display()
        )));
    }
    let mut shards: Vec<Vec<&String>> = Vec::new();
    let mut current: Vec<&String> = Vec::new();
    let mut filled = 0u64;
    for (key, t) in tensors {
        let size = t.data().len() as u64;
        if !current.is_empty() && filled + size > limit {
            shards.push(std::mem::take(&mut current));
            filled = 0;
        }
        current.push(key);
        filled += size;
    }
    shards.push(current);
    if shards.len() == 1 {
        write_file(tensors, shards[0].iter().copied(), &out.join("model.safetensors"))?;
        return Ok(1);
    }
    let count = shards.len();
    let mut weight_map = BTreeMap::new();
    for (i, keys) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
        write_file(tensors, keys.iter().copied(), &out.join(&name))?;
        written(keys.iter().map(|k| tensors[*k].data().len() as u64).sum());
        weight_map.extend(keys.iter().map(|k| (k.to_string(), name.clone())));
    }
    let total: u64 = tensors.values().map(|t| t.data().len() as u64).sum();
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let path = out.join("model.safetensors.index.json");
    let text =
        serde_json::to_string_pretty(&index).map_err(|e| CliError::msg(format!("cannot encode the index: {e}")))?;
    std::fs::write(&path, text + "\n")
        .map_err(|e| CliError::msg(format!("cannot write file=`{}`: {e}", path.display())))?;
    Ok(count)
}

/// A size as Hugging Face writes it: `5GB` (10^9), `500MiB` (2^20), `100KB`, or bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.parse().map_err(|_| format!("not a size: `{text}` (e.g. 5GB, 500MiB)"))?;
    let scale: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        _ => return Err(format!("unknown size unit in `{text}` (B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    match number.checked_mul(scale) {
        Some(0) | None => Err(format!("not a usable shard size: `{text}`")),
        Some(bytes) => Ok(bytes),
    }
}

fn normalize(dtype: &str) -> String {
    match dtype.to_ascii_lowercase().as_str() {
        "float32" | "fp32" => "F32".into(),
        "float16" | "fp16" | "half" => "F16".into(),
        "bfloat16" => "BF16".into(),
        "float64" | "double" => "F64".into(),
        "fp8" | "fp8_e4m3" | "float8_e4m3fn" | "e4m3" => "F8_E4M3".into(),
        "fp8_e5m2" | "float8_e5m2" | "e5m2" => "F8_E5M2".into(),
        other => other.to_ascii_uppercase(),
    }
}

pub fn import(src: &Path, uri: &str, step: u64) -> CommandResult {
    let files = source_files(src)?;
    let sizes: Vec<u64> = files.iter().map(|f| std::fs::metadata(f).map_or(0, |m| m.len())).collect();
    let bar = output::progress(sizes.iter().sum(), "reading");
    let mut state = State::new();
    for (file, size) in files.iter().zip(sizes) {
        read_safetensors(file, &mut state)?;
        bar.inc(size);
    }
    bar.finish_and_clear();
    let info = cairn::save(uri, &state, &SaveOptions::default().with_step(step))?;
    println!("imported {} tensors ({}) as {}", info.num_tensors, output::size(info.tensor_bytes), info.uri);
    Ok(ExitCode::SUCCESS)
}

/// The safetensors files of `src`: the file itself, the shards named by a Hugging Face
/// `model.safetensors.index.json`, or `model.safetensors` in a folder.
fn source_files(src: &Path) -> Result<Vec<PathBuf>, CliError> {
    if src.is_file() {
        return Ok(vec![src.to_path_buf()]);
    }
    let index = src.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index)
            .map_err(|e| CliError::msg(format!("cannot read file=`{}`: {e}", index.display())))?;
        let doc: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| CliError::msg(format!("invalid index file=`{}`: {e}", index.display())))?;
        let map = doc["weight_map"]
            .as_object()
            .ok_or_else(|| CliError::msg(format!("index has no weight_map file=`{}`", index.display())))?;
        let mut names: Vec<&str> = map.values().filter_map(|v| v.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        return names
            .into_iter()
            .map(|name| {
                if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                    Err(CliError::msg(format!(
                        "index names a file outside its folder data_file=`{name}` file=`{}`",
                        index.display()
                    )))
                } else {
                    Ok(src.join(name))
                }
            })
            .collect();
    }
    let single = src.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(CliError::msg(format!("no safetensors file, index or model.safetensors at path=`{}`", src.display())))
}

fn read_safetensors(path: &Path, state: &mut State) -> Result<(), CliError> {
    let shown = path.display();
    let file = std::fs::File::open(path).map_err(|e| CliError::msg(format!("cannot open file=`{shown}`: {e}")))?;
    // SAFETY: the file is only read; it is not expected to change while we import it.
    let map =
        unsafe { memmap2::Mmap::map(&file) }.map_err(|e| CliError::msg(format!("cannot map file=`{shown}`: {e}")))?;
    let base = Bytes::from_owner(map);
    let parsed = safetensors::SafeTensors::deserialize(&base)
        .map_err(|e| CliError::msg(format!("not a valid safetensors file file=`{shown}`: {e:?}")))?;
    let mut found = Vec::new();
    for (name, view) in parsed.iter() {
        let dtype = DType::from_safetensors(view.dtype()).ok_or_else(|| {
            CliError::msg(format!("unsupported dtype {:?} tensor=`{name}` file=`{shown}`", view.dtype()))
        })?;
        let start = view.data().as_ptr() as usize - base.as_ptr() as usize;
        found.push((
            name.to_string(),
            dtype,
            view.shape().iter().map(|&d| d as u64).collect::<Vec<_>>(),
            start,
            view.data().len(),
        ));
    }
    drop(parsed);
    for (name, dtype, shape, start, len) in found {
        if state.get(&name).is_some() {
            return Err(CliError::msg(format!("tensor appears in two files tensor=`{name}` file=`{shown}`")));
        }
        state.insert_tensor(name, Tensor::new(dtype, shape, base.slice(start..start + len))?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn shard_sizes_read_as_hugging_face_writes_them() {
        assert_eq!(parse_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("40kb"), Ok(40_000));
        assert_eq!(parse_size("123"), Ok(123));
        for bad in ["", "GB", "5 parsecs", "0MB", "99999999999999999999GB"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
