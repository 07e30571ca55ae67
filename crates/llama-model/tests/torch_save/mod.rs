//! Writes a state dict the way `torch.save` does (PyTorch ≥ 1.6's zip
//! format), so `pytorch_model.bin` loading is tested without Python.
//!
//! The archive holds `archive/data.pkl`, a protocol-2 pickle of an
//! `OrderedDict` whose values reduce through
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
//! requires_grad, backward_hooks)`, each storage a persistent id
//! `("storage", torch.HalfStorage, key, "cpu", numel)` whose bytes are the
//! stored entry `archive/data/<key>`; plus `archive/version` and
//! `archive/byteorder`.

use std::io::Write;
use std::path::Path;

use candle_core::{DType, Tensor};

/// One tensor to save: its values as `dtype`, optionally placed `offset`
/// elements into a larger storage (a view, as slicing in PyTorch makes).
pub struct Entry<'a> {
    pub name: &'a str,
    pub tensor: &'a Tensor,
    pub dtype: DType,
    pub offset: usize,
}

struct Pickle(Vec<u8>);

impl Pickle {
    fn op(&mut self, code: u8) {
        self.0.push(code);
    }

    fn global(&mut self, module: &str, name: &str) {
        self.op(b'c');
        self.0
            .extend_from_slice(format!("{module}\n{name}\n").as_bytes());
    }

    fn unicode(&mut self, text: &str) {
        self.op(b'X');
        self.0.extend_from_slice(&(text.len() as u32).to_le_bytes());
        self.0.extend_from_slice(text.as_bytes());
    }

    fn int(&mut self, value: usize) {
        self.op(b'J');
        self.0.extend_from_slice(&(value as i32).to_le_bytes());
    }

    fn int_tuple(&mut self, values: &[usize]) {
        self.op(b'(');
        for &v in values {
            self.int(v);
        }
        self.op(b't');
    }

    fn empty_ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }
}

fn storage_class(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "HalfStorage",
        DType::BF16 => "BFloat16Storage",
        DType::F32 => "FloatStorage",
        other => panic!("no storage class for {other:?} in this writer"),
    }
}

fn raw_bytes(tensor: &Tensor, dtype: DType) -> Vec<u8> {
    let flat = tensor.to_dtype(dtype).unwrap().flatten_all().unwrap();
    match dtype {
        DType::F16 => flat
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        _ => flat
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    }
}

/// Contiguous (row-major) strides of `dims`, in elements.
fn strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * dims[i + 1];
    }
    strides
}

pub fn save(entries: &[Entry], path: &Path) {
    let mut pickle = Pickle(vec![0x80, 2]);
    pickle.empty_ordered_dict();
    pickle.op(b'(');
    let mut storages = Vec::new();
    for (key, entry) in entries.iter().enumerate() {
        let dims = entry.tensor.dims().to_vec();
        let numel: usize = dims.iter().product::<usize>() + entry.offset;
        pickle.unicode(entry.name);
        pickle.global("torch._utils", "_rebuild_tensor_v2");
        pickle.op(b'(');
        // The storage, as a persistent id the unpickler resolves to a file.
        pickle.op(b'(');
        pickle.unicode("storage");
        pickle.global("torch", storage_class(entry.dtype));
        pickle.unicode(&key.to_string());
        pickle.unicode("cpu");
        pickle.int(numel);
        pickle.op(b't');
        pickle.op(b'Q');
        pickle.int(entry.offset);
        pickle.int_tuple(&dims);
        pickle.int_tuple(&strides(&dims));
        pickle.op(0x89); // NEWFALSE: requires_grad
        pickle.empty_ordered_dict(); // backward hooks
        pickle.op(b't');
        pickle.op(b'R');
        // Elements before the view's offset belong to nobody: junk values.
        let mut bytes = vec![0xAB; entry.offset * entry.dtype.size_in_bytes()];
        bytes.extend(raw_bytes(entry.tensor, entry.dtype));
        storages.push(bytes);
    }
    pickle.op(b'u');
    pickle.op(b'.');
    write_archive(&pickle.0, &storages, path);
}

/// The zip around a pickle and its storages, as `torch.save` lays it out.
pub fn write_archive(pickle: &[u8], storages: &[Vec<u8>], path: &Path) {
    let file = std::fs::File::create(path).unwrap();
    let mut zip = zip::ZipWriter::new(file);
    // torch.save stores its entries uncompressed, 64-byte aligned.
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .with_alignment(64);
    zip.start_file("archive/data.pkl", options).unwrap();
    zip.write_all(pickle).unwrap();
    zip.start_file("archive/byteorder", options).unwrap();
    zip.write_all(b"little").unwrap();
    for (key, bytes) in storages.iter().enumerate() {
        zip.start_file(format!("archive/data/{key}"), options)
            .unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.start_file("archive/version", options).unwrap();
    zip.write_all(b"3\n").unwrap();
    zip.finish().unwrap();
}
