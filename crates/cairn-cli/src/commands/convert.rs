//! `cairn export` (one plain safetensors file) and `cairn import` (a safetensors file or a
//! Hugging Face sharded folder into a checkpoint).

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

pub fn export(uri: &str, out: &Path, prefixes: Vec<String>, dtype: Option<&str>) -> CommandResult {
    let target = dtype.map(|d| DType::from_name(&normalize(d))).transpose()?;
    let ckpt = cairn::open(uri)?;
    let state = ckpt.load(&LoadOptions { prefixes, ..Default::default() })?;
    let mut tensors = BTreeMap::new();
    for (key, t) in state.tensors() {
        let t = match target {
            Some(to) if t.to_f64s().is_some() => t.cast(to)?,
            _ => t.clone(),
        };
        tensors.insert(key.clone(), t);
    }
    if tensors.contains_key("__metadata__") {
        return Err(CliError::msg("a tensor named `__metadata__` cannot be exported to safetensors"));
    }
    let views: Vec<(String, View)> =
        tensors.iter().map(|(k, t)| (k.clone(), View(t, t.shape().iter().map(|&d| d as usize).collect()))).collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(metadata), out)
        .map_err(|e| CliError::msg(format!("cannot write file=`{}`: {e}", out.display())))?;
    // safetensors writes through a private temporary file (mode 0600): an exported model
    // is for others to read, like any file the user writes.
    std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(|e| CliError::msg(format!("cannot set the mode of file=`{}`: {e}", out.display())))?;
    let bytes: u64 = tensors.values().map(|t| t.data().len() as u64).sum();
    println!(
        "exported {} tensors ({}) from step {} to {}",
        tensors.len(),
        output::size(bytes),
        ckpt.info().step,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}

fn normalize(dtype: &str) -> String {
    match dtype.to_ascii_lowercase().as_str() {
        "float32" | "fp32" => "F32".into(),
        "float16" | "fp16" | "half" => "F16".into(),
        "bfloat16" => "BF16".into(),
        "float64" | "double" => "F64".into(),
        other => other.to_ascii_uppercase(),
    }
}

pub fn import(src: &Path, uri: &str, step: u64) -> CommandResult {
    let files = source_files(src)?;
    let bar = output::progress(files.len() as u64, "reading");
    let mut state = State::new();
    for file in &files {
        read_safetensors(file, &mut state)?;
        bar.inc(1);
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
