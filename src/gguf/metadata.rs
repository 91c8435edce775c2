//! Ordered metadata with typed getters that report the key on a type mismatch.

use super::error::{GgufError, Result};
use super::value::{Array, ArrayItems, Value};
use std::collections::HashMap;

/// Key/value metadata in file order.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    entries: Vec<(String, Value)>,
    index: HashMap<String, usize>,
}

impl Metadata {
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces a key, returning `false` if it replaced an existing one.
    pub fn insert(&mut self, key: impl Into<String>, value: Value) -> bool {
        let key = key.into();
        if let Some(&i) = self.index.get(&key) {
            self.entries[i].1 = value;
            false
        } else {
            self.index.insert(key.clone(), self.entries.len());
            self.entries.push((key, value));
            true
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn wrong(key: &str, expected: &str, v: &Value) -> GgufError {
        GgufError::WrongKeyType {
            key: key.to_string(),
            expected: expected.to_string(),
            found: v.type_name(),
        }
    }

    fn required<'a>(&'a self, key: &str) -> Result<&'a Value> {
        self.get(key).ok_or_else(|| GgufError::MissingKey {
            key: key.to_string(),
        })
    }

    /// An unsigned integer (any integer width, non-negative).
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "unsigned integer", v)),
        }
    }

    pub fn require_u64(&self, key: &str) -> Result<u64> {
        let v = self.required(key)?;
        v.as_u64()
            .ok_or_else(|| Self::wrong(key, "unsigned integer", v))
    }

    /// A float (f32/f64, or an integer).
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "number", v)),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "string", v)),
        }
    }

    pub fn require_str(&self, key: &str) -> Result<&str> {
        let v = self.required(key)?;
        v.as_str().ok_or_else(|| Self::wrong(key, "string", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "bool", v)),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&Array>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_array()
                .map(Some)
                .ok_or_else(|| Self::wrong(key, "array", v)),
        }
    }

    /// An array of strings (tokenizer vocabularies, merges).
    pub fn get_str_array(&self, key: &str) -> Result<Option<&[String]>> {
        match self.get_array(key)? {
            None => Ok(None),
            Some(Array {
                items: ArrayItems::String(v),
                ..
            }) => Ok(Some(v)),
            Some(_) => Err(Self::wrong(
                key,
                "array[string]",
                self.get(key).unwrap_or(&Value::Bool(false)),
            )),
        }
    }

    /// An array of f32 (tokenizer scores).
    pub fn get_f32_array(&self, key: &str) -> Result<Option<&[f32]>> {
        match self.get_array(key)? {
            None => Ok(None),
            Some(Array {
                items: ArrayItems::F32(v),
                ..
            }) => Ok(Some(v)),
            Some(_) => Err(Self::wrong(
                key,
                "array[f32]",
                self.get(key).unwrap_or(&Value::Bool(false)),
            )),
        }
    }

    /// An array of i32 (tokenizer token types).
    pub fn get_i32_array(&self, key: &str) -> Result<Option<&[i32]>> {
        match self.get_array(key)? {
            None => Ok(None),
            Some(Array {
                items: ArrayItems::I32(v),
                ..
            }) => Ok(Some(v)),
            Some(_) => Err(Self::wrong(
                key,
                "array[i32]",
                self.get(key).unwrap_or(&Value::Bool(false)),
            )),
        }
    }

    /// `general.architecture`, the prefix of the hyper-parameter keys.
    pub fn architecture(&self) -> Result<&str> {
        self.require_str("general.architecture")
    }
}
