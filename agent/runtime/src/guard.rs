use crate::{Backend, RuntimeError, Tensor};
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Runs `backend` on `inputs`, turning a panic inside the runtime into an
/// error for this request instead of one for the process. (With
/// `panic = "abort"`, as on devices, a panic still ends the process.)
pub fn run_guarded(backend: &dyn Backend, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
    catch_unwind(AssertUnwindSafe(|| backend.run(inputs))).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        Err(RuntimeError::Run(format!("runtime panicked: {what}")))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorData;
    use tern_proto::TensorSpec;

    /// Echoes; panics on an empty input.
    struct Echo;

    impl Backend for Echo {
        fn inputs(&self) -> &[TensorSpec] {
            &[]
        }
        fn outputs(&self) -> &[TensorSpec] {
            &[]
        }
        fn run(&self, inputs: Vec<Tensor>) -> Result<Vec<Tensor>, RuntimeError> {
            assert!(!inputs.is_empty(), "no input");
            Ok(inputs)
        }
    }

    #[test]
    fn a_panicking_run_is_an_error_and_the_next_run_works() {
        let err = run_guarded(&Echo, vec![]).unwrap_err();
        assert_eq!(err, RuntimeError::Run("runtime panicked: no input".into()));
        let t = Tensor::new(vec![1], TensorData::F32(vec![1.0])).unwrap();
        assert_eq!(run_guarded(&Echo, vec![t.clone()]).unwrap(), vec![t]);
    }
}
