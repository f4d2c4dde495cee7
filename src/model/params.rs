//! The model's trainable tensors, in load order, under their Hugging Face names.

use candle_core::{Result as CResult, Tensor, Var};
use std::collections::{HashMap, HashSet};

#[derive(Default)]
pub struct Params {
    entries: Vec<(String, Var)>,
    index: HashMap<String, usize>,
    /// The weights of embedding tables (torch's `nn.Embedding` modules).
    embeddings: HashSet<String>,
}

impl Params {
    pub fn insert(&mut self, name: String, var: Var) -> Tensor {
        let t = var.as_tensor().clone();
        self.index.insert(name.clone(), self.entries.len());
        self.entries.push((name, var));
        t
    }

    /// Marks `name` as an embedding table's weight.
    pub fn mark_embedding(&mut self, name: &str) {
        self.embeddings.insert(name.to_string());
    }

    /// Whether `name` is an embedding table's weight (bitsandbytes' 8-bit optimizers keep
    /// 32-bit state for those, as transformers registers them).
    pub fn is_embedding(&self, name: &str) -> bool {
        self.embeddings.contains(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Var)> {
        self.entries.iter().map(|(n, v)| (n.as_str(), v))
    }

    pub fn get(&self, name: &str) -> Option<&Var> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn num_elements(&self) -> usize {
        self.entries.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Detached copies of every tensor, keyed by name (for saving).
    pub fn snapshot(&self) -> CResult<HashMap<String, Tensor>> {
        self.entries
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().detach().copy()?)))
            .collect()
    }
}
