//! Adam with Keras' defaults and update rule, over the variables of a
//! `VarMap`, with a state (moments and step count) that can be saved to and
//! restored from a safetensors file for checkpoints.
//!
//! The update at step `t` (1-based) for gradient `g`:
//!
//! ```text
//! m = beta1 m + (1 - beta1) g
//! v = beta2 v + (1 - beta2) g^2
//! w -= lr sqrt(1 - beta2^t) / (1 - beta1^t) * m / (sqrt(v) + eps)
//! ```
//!
//! which is Keras' form (epsilon outside the bias correction). Variables are
//! kept sorted by name so the update order, and the saved file, are the
//! same on every run.

use std::collections::HashMap;
use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

use crate::model::sorted_vars;
use crate::{Error, Result};

/// Adam hyper-parameters; `Default` gives Keras' values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Learning rate (default 1e-3).
    pub lr: f64,
    /// Decay of the first moment (default 0.9).
    pub beta1: f64,
    /// Decay of the second moment (default 0.999).
    pub beta2: f64,
    /// Added to `sqrt(v)` (default 1e-7, Keras; PyTorch uses 1e-8).
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-7,
        }
    }
}

/// The optimiser: one first and second moment per variable.
pub struct Adam {
    config: AdamConfig,
    /// Variables sorted by name.
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates applied so far.
    step: u64,
}

impl Adam {
    /// An optimiser for every variable currently in `varmap`, with zero
    /// moments.
    pub fn new(varmap: &VarMap, config: AdamConfig) -> Result<Self> {
        let vars = sorted_vars(varmap);
        let zeros = |var: &Var| var.as_tensor().zeros_like();
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<_, _>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamConfig {
        &self.config
    }

    /// Updates applied so far.
    pub fn n_steps(&self) -> u64 {
        self.step
    }

    /// Backpropagates `loss` (a scalar) and applies one update.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.apply(&grads)
    }

    /// Applies one update from `grads`. Variables without a gradient keep
    /// their value and moments.
    pub fn apply(&mut self, grads: &GradStore) -> Result<()> {
        self.step += 1;
        let c = self.config;
        let t = self.step as f64;
        let alpha = c.lr * (1.0 - c.beta2.powf(t)).sqrt() / (1.0 - c.beta1.powf(t));

        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let m = ((&self.m[i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let delta = (&m * alpha)?.div(&(v.sqrt()? + c.eps)?)?;
            var.set(&var.as_tensor().detach().sub(&delta)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// The state as named tensors: `m.{var}`, `v.{var}` and the scalar
    /// `step` (i64).
    pub fn state(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = HashMap::with_capacity(2 * self.vars.len() + 1);
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out.insert(
            "step".to_string(),
            Tensor::new(self.step as i64, &Device::Cpu)?,
        );
        Ok(out)
    }

    /// Restores a state from [`Adam::state`]. Every variable must have both
    /// moments with its own shape; `origin` names the source in errors.
    pub fn set_state(&mut self, state: &HashMap<String, Tensor>, origin: &Path) -> Result<()> {
        let bad = |message: String| Error::Checkpoint {
            path: origin.to_path_buf(),
            message,
        };
        let step = state
            .get("step")
            .ok_or_else(|| bad("optimiser state has no `step`".into()))?
            .to_dtype(DType::I64)?
            .to_scalar::<i64>()?;

        let mut m = Vec::with_capacity(self.vars.len());
        let mut v = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            for (kind, out) in [("m", &mut m), ("v", &mut v)] {
                let key = format!("{kind}.{name}");
                let t = state
                    .get(&key)
                    .ok_or_else(|| bad(format!("optimiser state has no `{key}`")))?;
                if t.shape() != var.shape() {
                    return Err(bad(format!(
                        "optimiser `{key}` has shape {:?}, the variable {:?}",
                        t.dims(),
                        var.dims()
                    )));
                }
                out.push(t.to_device(var.device())?.to_dtype(var.dtype())?);
            }
        }

        self.m = m;
        self.v = v;
        self.step = u64::try_from(step).map_err(|_| bad(format!("negative step {step}")))?;
        Ok(())
    }

    /// Writes the state to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.state()?, path)?;
        Ok(())
    }

    /// Reads a state written by [`Adam::save`].
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let state =
            candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                message: format!("unreadable optimiser state: {e}"),
            })?;
        self.set_state(&state, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_nn::Init;

    // Reference: one variable w = [1, -2], loss = sum(w^2), three Keras Adam
    // steps with lr 0.1. Produced with
    //   import numpy as np
    //   w = np.array([1., -2.]); m = np.zeros(2); v = np.zeros(2)
    //   for t in range(1, 4):
    //       g = 2 * w
    //       m = 0.9 * m + 0.1 * g; v = 0.999 * v + 0.001 * g * g
    //       a = 0.1 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
    //       w = w - a * m / (np.sqrt(v) + 1e-7)
    //   print(repr(w))
    // -> array([ 0.70158664, -1.70062357])
    #[test]
    fn three_steps_match_the_keras_update() -> Result<()> {
        let varmap = VarMap::new();
        let w = varmap.get(2, "w", Init::Const(0.0), DType::F32, &Device::Cpu)?;
        varmap.data().lock().expect("fresh lock")["w"]
            .set(&Tensor::new(&[1f32, -2.0], &Device::Cpu)?)?;
        let mut adam = Adam::new(
            &varmap,
            AdamConfig {
                lr: 0.1,
                ..AdamConfig::default()
            },
        )?;
        for _ in 0..3 {
            adam.backward_step(&w.sqr()?.sum_all()?)?;
        }
        let got = w.to_vec1::<f32>()?;
        assert!((got[0] - 0.701_586_6).abs() < 1e-5, "{got:?}");
        assert!((got[1] + 1.700_623_6).abs() < 1e-5, "{got:?}");
        assert_eq!(adam.n_steps(), 3);
        Ok(())
    }

    #[test]
    fn saved_state_restores_moments_and_step() -> Result<()> {
        let varmap = VarMap::new();
        let w = varmap.get(3, "w", Init::Const(0.5), DType::F32, &Device::Cpu)?;
        let mut adam = Adam::new(&varmap, AdamConfig::default())?;
        adam.backward_step(&w.sqr()?.sum_all()?)?;

        let dir = std::env::temp_dir().join(format!("rotsweep-adam-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let path = dir.join("adam.safetensors");
        adam.save(&path)?;

        let mut fresh = Adam::new(&varmap, AdamConfig::default())?;
        fresh.load(&path)?;
        assert_eq!(fresh.n_steps(), 1);
        assert_eq!(fresh.m[0].to_vec1::<f32>()?, adam.m[0].to_vec1::<f32>()?);
        assert_eq!(fresh.v[0].to_vec1::<f32>()?, adam.v[0].to_vec1::<f32>()?);

        // Both continue identically.
        let before = w.to_vec1::<f32>()?;
        adam.backward_step(&w.sqr()?.sum_all()?)?;
        let after_a = w.to_vec1::<f32>()?;
        varmap.data().lock().expect("fresh lock")["w"]
            .set(&Tensor::new(before.as_slice(), &Device::Cpu)?)?;
        fresh.backward_step(&w.sqr()?.sum_all()?)?;
        assert_eq!(w.to_vec1::<f32>()?, after_a);
        std::fs::remove_dir_all(&dir).ok();
        Ok(())
    }
}
