//! Request bodies of the agent's local API: what one predict request may
//! make the agent allocate, and decoding its JSON body within that. Limits come from the model's signature: a dynamic
//! batch axis is capped at the model's maximum batch, other dynamic axes at
//! a per-input element cap, fixed axes are what they are. Bodies larger than
//! the limit their inputs allow are refused before they are read; JSON is
//! parsed straight into typed buffers (no `Value` tree), each capped at its
//! input's limit while it is read.

use crate::{DType, Tensor, TensorData, TensorSpec};
use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, SeqAccess, Visitor};
use serde_json::value::RawValue;
use std::cell::RefCell;
use std::fmt;

/// JSON bytes allowed per element (a float with its separator and some
/// whitespace): what the JSON body limit is made of.
pub const JSON_BYTES_PER_ELEMENT: usize = 40;
/// Inputs one request may carry, at most.
const MAX_INPUTS: usize = 64;
/// Dimensions one tensor may have, at most.
const MAX_RANK: usize = 16;

/// The agent's limits on requests (flags or device profile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest batch a model with a dynamic first axis takes in one request.
    pub max_batch: usize,
    /// Most elements one input may have when an axis other than the first is
    /// dynamic.
    pub max_elements: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_batch: 64, max_elements: 4 << 20 }
    }
}

/// A request over a limit (the agent answers 413).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TooLarge(pub String);

/// One model's request limits, computed once from its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLimits {
    limits: Limits,
    /// Most elements of each input, in the model's order.
    pub elements: Vec<usize>,
    /// Largest binary tensor body.
    pub binary_body: usize,
    /// Largest JSON body.
    pub json_body: usize,
    /// Most bytes the decoded inputs take.
    pub decoded: usize,
}

fn element_size(d: DType) -> usize {
    match d {
        DType::F32 | DType::I32 | DType::U32 => 4,
        DType::F64 | DType::I64 | DType::U64 => 8,
        DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 2,
        DType::I8 | DType::U8 | DType::Bool => 1,
    }
}

impl RequestLimits {
    /// The limits of a model with input signature `specs`.
    pub fn new(specs: &[TensorSpec], limits: Limits) -> Self {
        let elements: Vec<usize> = specs
            .iter()
            .map(|s| {
                let mut n = 1usize;
                for (axis, d) in s.shape.iter().enumerate() {
                    let d = match d {
                        Some(d) => usize::try_from(*d).unwrap_or(usize::MAX),
                        None if axis == 0 => limits.max_batch,
                        None => return limits.max_elements,
                    };
                    n = n.saturating_mul(d);
                }
                n
            })
            .collect();
        let sum = |f: &dyn Fn(&TensorSpec, usize) -> usize| {
            specs.iter().zip(&elements).fold(0usize, |acc, (s, n)| acc.saturating_add(f(s, *n)))
        };
        Self {
            limits,
            binary_body: 4usize.saturating_add(sum(&|s, n| {
                (2 + 4 * s.shape.len()).saturating_add(n.saturating_mul(element_size(s.dtype)))
            })),
            json_body: 4096usize.saturating_add(sum(&|s, n| {
                (128 + s.name.len() + 24 * s.shape.len()).saturating_add(n.saturating_mul(JSON_BYTES_PER_ELEMENT))
            })),
            decoded: sum(&|s, n| n.saturating_mul(element_size(s.dtype))),
            elements,
        }
    }

    /// Checks the shape of input `ix` (of `specs`) against the batch and
    /// element limits, before any of its data is read.
    pub fn check_shape(&self, specs: &[TensorSpec], ix: usize, shape: &[usize]) -> Result<(), TooLarge> {
        let Some(spec) = specs.get(ix) else {
            return Err(TooLarge(format!("the model has {} inputs, this is input {}", specs.len(), ix + 1)));
        };
        if spec.shape.first() == Some(&None)
            && let Some(&batch) = shape.first()
            && batch > self.limits.max_batch
        {
            return Err(TooLarge(format!(
                "input {:?}: a batch of {batch} exceeds this agent's maximum batch of {} (tern-agent run --max-batch)",
                spec.name, self.limits.max_batch
            )));
        }
        let max = self.elements[ix];
        match shape.iter().try_fold(1usize, |a, d| a.checked_mul(*d)) {
            Some(n) if n <= max => Ok(()),
            _ => Err(TooLarge(format!(
                "input {:?}: shape {shape:?} exceeds this model's limit of {max} elements (tern-agent run --max-elements)",
                spec.name
            ))),
        }
    }

    /// Checks decoded inputs (already matched to the signature) against the
    /// batch and element limits.
    pub fn check(&self, specs: &[TensorSpec], inputs: &[Tensor]) -> Result<(), TooLarge> {
        inputs.iter().enumerate().try_for_each(|(ix, t)| self.check_shape(specs, ix, &t.shape))
    }
}

/// Why a JSON body did not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JsonError {
    /// Malformed, or does not fit the signature (the agent answers 400).
    Bad(String),
    /// Over a limit (413).
    TooLarge(String),
}

/// A vector of at most `MAX` items, refused while it is read beyond that.
struct Bounded<T, const MAX: usize>(Vec<T>);

impl<'de, T: Deserialize<'de>, const MAX: usize> Deserialize<'de> for Bounded<T, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, const MAX: usize>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>, const MAX: usize> Visitor<'de> for V<T, MAX> {
            type Value = Bounded<T, MAX>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a list of at most {MAX} items")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if out.len() == MAX {
                        return Err(de::Error::custom(format!("more than {MAX} items")));
                    }
                    out.push(item);
                }
                Ok(Bounded(out))
            }
        }
        d.deserialize_seq(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow)]
    inputs: Bounded<RawTensor<'a>, MAX_INPUTS>,
}

#[derive(Deserialize)]
struct RawTensor<'a> {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    dtype: Option<DType>,
    shape: Bounded<usize, MAX_RANK>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// JSON tensors to runtime tensors, in the model's input order. Unnamed
/// inputs are taken in order; the element type defaults to the model's.
pub fn decode_json(body: &[u8], specs: &[TensorSpec], limits: &RequestLimits) -> Result<Vec<Tensor>, JsonError> {
    let req: RawRequest = serde_json::from_slice(body).map_err(|e| JsonError::Bad(format!("bad JSON body: {e}")))?;
    let inputs = req.inputs.0;
    let named = !inputs.is_empty() && inputs.iter().all(|t| t.name.is_some());
    let mut ordered: Vec<(usize, RawTensor)> = Vec::with_capacity(inputs.len());
    for (i, t) in inputs.into_iter().enumerate() {
        let ix = if named {
            let name = t.name.as_deref().expect("checked");
            specs.iter().position(|s| s.name == name).ok_or_else(|| {
                let names: Vec<_> = specs.iter().map(|s| s.name.as_str()).collect();
                JsonError::Bad(format!("model has no input {name:?} (inputs: {})", names.join(", ")))
            })?
        } else {
            i
        };
        ordered.push((ix, t));
    }
    ordered.sort_by_key(|(ix, _)| *ix);
    ordered
        .into_iter()
        .map(|(ix, t)| {
            let spec = specs.get(ix);
            let name = spec.map_or("?", |s| s.name.as_str());
            let dtype = t.dtype.or(spec.map(|s| s.dtype)).unwrap_or(DType::F32);
            let shape = t.shape.0;
            limits.check_shape(specs, ix, &shape).map_err(|e| JsonError::TooLarge(e.0))?;
            let max = limits.elements[ix];
            let declared = shape.iter().product();
            let data = elements(name, t.data, dtype, max, declared)?;
            Tensor::new(shape, data).map_err(|e| JsonError::Bad(format!("input {name:?}: {e}")))
        })
        .collect()
}

/// A JSON number or boolean as one element type; `None` if it is not one.
trait Element: Sized {
    fn from_i64(n: i64) -> Option<Self>;
    fn from_u64(n: u64) -> Option<Self>;
    fn from_f64(_x: f64) -> Option<Self> {
        None
    }
    fn from_bool(_b: bool) -> Option<Self> {
        None
    }
    /// What the error calls the expected element.
    const WHAT: &'static str;
}

macro_rules! int_element {
    ($($t:ty),*) => {$(
        impl Element for $t {
            fn from_i64(n: i64) -> Option<Self> { <$t>::try_from(n).ok() }
            fn from_u64(n: u64) -> Option<Self> { <$t>::try_from(n).ok() }
            const WHAT: &'static str = stringify!($t);
        }
    )*};
}
int_element!(i8, i16, i32, i64, u8, u16, u32, u64);

impl Element for f32 {
    fn from_i64(n: i64) -> Option<Self> {
        Some(n as f32)
    }
    fn from_u64(n: u64) -> Option<Self> {
        Some(n as f32)
    }
    fn from_f64(x: f64) -> Option<Self> {
        Some(x as f32)
    }
    const WHAT: &'static str = "number";
}

impl Element for f64 {
    fn from_i64(n: i64) -> Option<Self> {
        Some(n as f64)
    }
    fn from_u64(n: u64) -> Option<Self> {
        Some(n as f64)
    }
    fn from_f64(x: f64) -> Option<Self> {
        Some(x)
    }
    const WHAT: &'static str = "number";
}

macro_rules! half_element {
    ($($t:ty),*) => {$(
        // Rounded to the nearest value the type holds; beyond its range, infinite.
        impl Element for $t {
            fn from_i64(n: i64) -> Option<Self> { Some(<$t>::from_f64(n as f64)) }
            fn from_u64(n: u64) -> Option<Self> { Some(<$t>::from_f64(n as f64)) }
            fn from_f64(x: f64) -> Option<Self> { Some(<$t>::from_f64(x)) }
            const WHAT: &'static str = "number";
        }
    )*};
}
half_element!(half::f16, half::bf16);

impl Element for bool {
    fn from_i64(_n: i64) -> Option<Self> {
        None
    }
    fn from_u64(_n: u64) -> Option<Self> {
        None
    }
    fn from_bool(b: bool) -> Option<Self> {
        Some(b)
    }
    const WHAT: &'static str = "bool";
}

/// Pushes the elements of a (possibly nested) JSON array into `out`.
struct Elements<'a, T> {
    out: &'a RefCell<Vec<T>>,
    max: usize,
    depth: usize,
    /// The first error, in words a person can act on (serde's own message
    /// would add a line and column of the inner document).
    error: &'a RefCell<Option<JsonError>>,
}

impl<T> Elements<'_, T> {
    fn fail<E: de::Error>(&self, e: JsonError) -> E {
        let msg = match &e {
            JsonError::Bad(m) | JsonError::TooLarge(m) => m.clone(),
        };
        self.error.borrow_mut().get_or_insert(e);
        E::custom(msg)
    }

    fn push<E: de::Error>(&self, v: Option<T>, shown: &dyn fmt::Display) -> Result<(), E>
    where
        T: Element,
    {
        let mut out = self.out.borrow_mut();
        let i = out.len();
        let Some(v) = v else {
            return Err(self.fail(JsonError::Bad(format!("element {i} ({shown}) is not a {}", T::WHAT))));
        };
        if i == self.max {
            return Err(self.fail(JsonError::TooLarge(format!("more than {} elements", self.max))));
        }
        out.push(v);
        Ok(())
    }
}

impl<'de, T: Element> DeserializeSeed<'de> for Elements<'_, T> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, T: Element> Visitor<'de> for Elements<'_, T> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "a {} or a list of them", T::WHAT)
    }

    fn visit_i64<E: de::Error>(self, n: i64) -> Result<(), E> {
        self.push(T::from_i64(n), &n)
    }

    fn visit_u64<E: de::Error>(self, n: u64) -> Result<(), E> {
        self.push(T::from_u64(n), &n)
    }

    fn visit_f64<E: de::Error>(self, x: f64) -> Result<(), E> {
        self.push(T::from_f64(x), &x)
    }

    fn visit_bool<E: de::Error>(self, b: bool) -> Result<(), E> {
        self.push(T::from_bool(b), &b)
    }

    fn visit_str<E: de::Error>(self, s: &str) -> Result<(), E> {
        self.push(None, &format_args!("{s:?}"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.push(None, &"null")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        self.push(None, &"an object")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth == MAX_RANK {
            return Err(self.fail(JsonError::Bad(format!("data nested deeper than {MAX_RANK} levels"))));
        }
        while seq
            .next_element_seed(Elements { out: self.out, max: self.max, depth: self.depth + 1, error: self.error })?
            .is_some()
        {}
        Ok(())
    }
}

fn parse<T: Element>(name: &str, raw: &RawValue, max: usize, capacity: usize) -> Result<Vec<T>, JsonError> {
    let out = RefCell::new(Vec::with_capacity(capacity));
    let error = RefCell::new(None);
    let mut de = serde_json::Deserializer::from_str(raw.get());
    let seed = Elements { out: &out, max, depth: 0, error: &error };
    if let Err(e) = seed.deserialize(&mut de) {
        return Err(match error.into_inner() {
            Some(JsonError::Bad(m)) => JsonError::Bad(format!("input {name:?}: {m}")),
            Some(JsonError::TooLarge(m)) => JsonError::TooLarge(format!("input {name:?}: {m}")),
            None => JsonError::Bad(format!("input {name:?}: {e}")),
        });
    }
    Ok(out.into_inner())
}

fn elements(name: &str, raw: &RawValue, dtype: DType, max: usize, declared: usize) -> Result<TensorData, JsonError> {
    // Room for what the shape announced (already checked against `max`) and
    // the data can hold (two bytes an element at least), no more.
    let cap = declared.min(raw.get().len() / 2 + 1);
    Ok(match dtype {
        DType::F32 => TensorData::F32(parse(name, raw, max, cap)?),
        DType::F64 => TensorData::F64(parse(name, raw, max, cap)?),
        DType::I8 => TensorData::I8(parse(name, raw, max, cap)?),
        DType::I16 => TensorData::I16(parse(name, raw, max, cap)?),
        DType::I32 => TensorData::I32(parse(name, raw, max, cap)?),
        DType::I64 => TensorData::I64(parse(name, raw, max, cap)?),
        DType::U8 => TensorData::U8(parse(name, raw, max, cap)?),
        DType::U16 => TensorData::U16(parse(name, raw, max, cap)?),
        DType::U32 => TensorData::U32(parse(name, raw, max, cap)?),
        DType::U64 => TensorData::U64(parse(name, raw, max, cap)?),
        DType::Bool => TensorData::Bool(parse(name, raw, max, cap)?),
        DType::F16 => TensorData::F16(parse(name, raw, max, cap)?),
        DType::BF16 => TensorData::BF16(parse(name, raw, max, cap)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iris() -> Vec<TensorSpec> {
        vec![TensorSpec { name: "X".into(), dtype: DType::F32, shape: vec![None, Some(4)] }]
    }

    fn limits() -> RequestLimits {
        RequestLimits::new(&iris(), Limits { max_batch: 8, max_elements: 100 })
    }

    #[test]
    fn limits_follow_the_signature() {
        let l = limits();
        assert_eq!(l.elements, [32]);
        assert_eq!(l.binary_body, 4 + 2 + 8 + 32 * 4);
        assert_eq!(l.decoded, 128);
        let image = TensorSpec { name: "img".into(), dtype: DType::U8, shape: vec![None, Some(3), None, None] };
        assert_eq!(RequestLimits::new(&[image], Limits { max_batch: 8, max_elements: 100 }).elements, [100]);
        let fixed = TensorSpec { name: "x".into(), dtype: DType::F32, shape: vec![Some(1), Some(1000)] };
        assert_eq!(RequestLimits::new(&[fixed], Limits { max_batch: 8, max_elements: 100 }).elements, [1000]);
    }

    #[test]
    fn nested_and_flat_data_decode_to_the_same_tensor() {
        let flat = br#"{"inputs":[{"name":"X","shape":[2,4],"data":[1,2,3,4,5,6,7,8.5]}]}"#;
        let nested = br#"{"inputs":[{"shape":[2,4],"data":[[1,2,3,4],[5,6,7,8.5]]}]}"#;
        let a = decode_json(flat, &iris(), &limits()).unwrap();
        assert_eq!(a, decode_json(nested, &iris(), &limits()).unwrap());
        assert_eq!(a[0].data, TensorData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.5]));
    }

    #[test]
    fn half_precision_inputs_round_to_the_nearest_value_they_hold() {
        let spec = |dtype| vec![TensorSpec { name: "h".into(), dtype, shape: vec![Some(4)] }];
        let body = br#"{"inputs":[{"shape":[4],"data":[1, 0.1, 70000, -2.5]}]}"#;
        let l = |s: &[TensorSpec]| RequestLimits::new(s, Limits { max_batch: 8, max_elements: 100 });
        let f16s = spec(DType::F16);
        let t = decode_json(body, &f16s, &l(&f16s)).unwrap();
        let want = [1.0, 0.1, f32::INFINITY, -2.5].map(half::f16::from_f32);
        assert_eq!(t[0].data, TensorData::F16(want.to_vec()));
        let bf16s = spec(DType::BF16);
        let t = decode_json(body, &bf16s, &l(&bf16s)).unwrap();
        let want = [1.0, 0.1, 70000.0, -2.5].map(half::bf16::from_f32);
        assert_eq!(t[0].data, TensorData::BF16(want.to_vec()));
        assert_eq!(l(&f16s).decoded, 8, "two bytes an element");
        let e = decode_json(br#"{"inputs":[{"shape":[4],"data":[1,true,3,4]}]}"#, &f16s, &l(&f16s)).unwrap_err();
        assert_eq!(e, JsonError::Bad("input \"h\": element 1 (true) is not a number".into()));
    }

    #[test]
    fn errors_name_the_input_and_the_element() {
        let e = |body: &str| decode_json(body.as_bytes(), &iris(), &limits()).unwrap_err();
        assert_eq!(
            e(r#"{"inputs":[{"shape":[1,4],"data":[1,"x",3,4]}]}"#),
            JsonError::Bad("input \"X\": element 1 (\"x\") is not a number".into())
        );
        assert_eq!(
            e(r#"{"inputs":[{"shape":[1,4],"data":[1,2,3]}]}"#),
            JsonError::Bad("input \"X\": shape [1, 4] needs 4 elements, got 3".into())
        );
        assert_eq!(
            e(r#"{"inputs":[{"dtype":"i64","shape":[1,1],"data":[1.5]}]}"#),
            JsonError::Bad("input \"X\": element 0 (1.5) is not a i64".into())
        );
        assert!(
            matches!(e(r#"{"inputs":[{"name":"Y","shape":[1],"data":[1]}]}"#), JsonError::Bad(m) if m.contains("no input \"Y\""))
        );
        assert!(matches!(e("{not json"), JsonError::Bad(m) if m.starts_with("bad JSON body")));
    }

    #[test]
    fn what_exceeds_a_limit_is_refused_while_it_is_read() {
        let e = |body: &str| decode_json(body.as_bytes(), &iris(), &limits()).unwrap_err();
        // A shape beyond the limit: refused before its data is read.
        assert!(matches!(e(r#"{"inputs":[{"shape":[1000000000,4],"data":[]}]}"#), JsonError::TooLarge(_)));
        assert!(matches!(e(r#"{"inputs":[{"shape":[18446744073709551615,2],"data":[]}]}"#), JsonError::TooLarge(_)));
        // Data beyond it: refused at the element past the limit.
        let many = format!(r#"{{"inputs":[{{"shape":[8,4],"data":[{}]}}]}}"#, vec!["1"; 33].join(","));
        assert_eq!(e(&many), JsonError::TooLarge("input \"X\": more than 32 elements".into()));
        // Too many inputs, too many dimensions, too deep.
        let inputs = format!(r#"{{"inputs":[{}]}}"#, vec![r#"{"shape":[],"data":1}"#; 65].join(","));
        assert!(matches!(e(&inputs), JsonError::Bad(m) if m.contains("more than 64 items")));
        let rank = format!(r#"{{"inputs":[{{"shape":[{}],"data":1}}]}}"#, vec!["1"; 17].join(","));
        assert!(matches!(e(&rank), JsonError::Bad(m) if m.contains("more than 16 items")));
        let deep = format!(r#"{{"inputs":[{{"shape":[1,4],"data":{}1{}}}]}}"#, "[".repeat(20), "]".repeat(20));
        assert!(matches!(e(&deep), JsonError::Bad(m) if m.contains("nested deeper")));
    }

    #[test]
    fn batches_over_the_maximum_are_too_large() {
        let l = limits();
        let t = Tensor::new(vec![9, 4], TensorData::F32(vec![0.0; 36])).unwrap();
        assert!(l.check(&iris(), &[t]).unwrap_err().0.contains("a batch of 9 exceeds this agent's maximum batch of 8"));
        let t = Tensor::new(vec![8, 4], TensorData::F32(vec![0.0; 32])).unwrap();
        assert!(l.check(&iris(), &[t]).is_ok());
    }
}
