//! Recurrent layers (SimpleRNN and GRU) and their fused training ops.
//!
//! A recurrence unrolled with ordinary candle ops costs about 25 autograd
//! nodes per time step, and slicing step `t` out of a precomputed input
//! projection makes the backward pass O(T^2): candle's `narrow` backward pads
//! the gradient to the whole parent tensor (research/baselines.md, finding
//! 2). The fused path here instead:
//!
//! 1. projects the input of every time step with one matmul (outside the op,
//!    so candle differentiates it as usual; the bias through
//!    [`crate::ops::add_bias`]);
//! 2. runs the recurrence on detached tensors, time-major, so that step `t`
//!    is a contiguous view and records no graph;
//! 3. wraps the result in one custom op whose forward hands back the
//!    precomputed states and whose backward is a hand-written BPTT. The
//!    recurrent weight gradient is one (T*B x G*H)^T (T*B x H) matmul at the
//!    end instead of one matmul per step.
//!
//! The op only copies a finished tensor in its forward (the pattern of
//! [`crate::ops`]), so it runs on any device whose storage can be cloned
//! (CPU and CUDA).
//!
//! FIXME(#5): the CUDA path of these ops has not run on a GPU yet; a test
//! on one should compare it with [`Recurrence::Composed`] as the CPU tests
//! do. The plain per-step
//! composition is kept as [`Recurrence::Composed`]; tests check that both
//! give the same values and gradients.
//!
//! Conventions: tensors are time-major, `(T, B, features)`. Weights follow
//! candle's `Linear` layout `(out, in)`. The GRU is the "reset after"
//! variant (PyTorch, and Keras with `reset_after=True`), gate order
//! `[r, z, n]`:
//!
//! ```text
//! r = sigmoid(x W_ir^T + b_ir + h W_hr^T + b_hr)
//! z = sigmoid(x W_iz^T + b_iz + h W_hz^T + b_hz)
//! n = tanh(x W_in^T + b_in + r * (h W_hn^T + b_hn))
//! h' = (1 - z) * n + z * h
//! ```
//!
//! SimpleRNN (Keras): `h' = tanh(x W_ih^T + b + h W_hh^T)`, one bias.

use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Shape};
use candle_core::{IndexOp, Tensor};

use crate::ops::{cpu_result, cuda_result, fresh, sum_rows};

/// Which implementation a recurrent layer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Recurrence {
    /// One custom op per layer with a hand-written backward (the default).
    #[default]
    Fused,
    /// Plain candle ops per time step; slower, kept as the reference.
    Composed,
}

/// The cell of a recurrent layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    /// Keras SimpleRNN with tanh.
    Rnn,
    /// GRU, reset-after convention.
    Gru,
}

impl Cell {
    /// Gate blocks per unit: 1 for SimpleRNN, 3 for GRU.
    pub fn gates(self) -> usize {
        match self {
            Cell::Rnn => 1,
            Cell::Gru => 3,
        }
    }
}

/// SimpleRNN over a whole sequence.
///
/// - `xp`: input projection including the bias, `(T, B, H)`.
/// - `w_hh`: recurrent weight, `(H, H)`.
///
/// Returns every hidden state, `(T, B, H)`; the initial state is zero.
pub fn rnn_sequence(xp: &Tensor, w_hh: &Tensor, how: Recurrence) -> candle_core::Result<Tensor> {
    match how {
        Recurrence::Fused => rnn_fused(xp, w_hh),
        Recurrence::Composed => rnn_composed(xp, w_hh),
    }
}

/// GRU over a whole sequence.
///
/// - `xp`: input projection including `b_ih`, `(T, B, 3H)`, gates `[r, z, n]`.
/// - `w_hh`: recurrent weight, `(3H, H)`.
/// - `b_hh`: recurrent bias, `(3H)`.
///
/// Returns every hidden state, `(T, B, H)`; the initial state is zero.
pub fn gru_sequence(
    xp: &Tensor,
    w_hh: &Tensor,
    b_hh: &Tensor,
    how: Recurrence,
) -> candle_core::Result<Tensor> {
    match how {
        Recurrence::Fused => gru_fused(xp, w_hh, b_hh),
        Recurrence::Composed => gru_composed(xp, w_hh, b_hh),
    }
}

fn rnn_composed(xp: &Tensor, w_hh: &Tensor) -> candle_core::Result<Tensor> {
    let (n_steps, b, h) = xp.dims3()?;
    let wt = w_hh.t()?;

    let mut state = Tensor::zeros((b, h), xp.dtype(), xp.device())?;
    let mut states = Vec::with_capacity(n_steps);
    for t in 0..n_steps {
        state = (xp.i(t)? + state.matmul(&wt)?)?.tanh()?;
        states.push(state.clone());
    }
    Tensor::stack(&states, 0)
}

fn gru_composed(xp: &Tensor, w_hh: &Tensor, b_hh: &Tensor) -> candle_core::Result<Tensor> {
    let (n_steps, b, h3) = xp.dims3()?;
    let h = h3 / 3;
    let wt = w_hh.t()?;

    let mut state = Tensor::zeros((b, h), xp.dtype(), xp.device())?;
    let mut states = Vec::with_capacity(n_steps);
    for t in 0..n_steps {
        let x_t = xp.i(t)?;
        let hp = state.matmul(&wt)?.broadcast_add(b_hh)?;
        let rz = candle_nn::ops::sigmoid(&(x_t.narrow(1, 0, 2 * h)? + hp.narrow(1, 0, 2 * h)?)?)?;
        let r = rz.narrow(1, 0, h)?;
        let z = rz.narrow(1, h, h)?;
        let n = (x_t.narrow(1, 2 * h, h)? + (r * hp.narrow(1, 2 * h, h)?)?)?.tanh()?;
        state = (&n + (z * (&state - &n)?)?)?;
        states.push(state.clone());
    }
    Tensor::stack(&states, 0)
}

fn rnn_fused(xp: &Tensor, w_hh: &Tensor) -> candle_core::Result<Tensor> {
    let (n_steps, b, h) = xp.dims3()?;
    let xs = xp.detach().contiguous()?;
    let wt = w_hh.detach().t()?.contiguous()?;

    let mut state = Tensor::zeros((b, h), xp.dtype(), xp.device())?;
    let mut states = Vec::with_capacity(n_steps);
    for t in 0..n_steps {
        state = (xs.i(t)? + state.matmul(&wt)?)?.tanh()?;
        states.push(state.clone());
    }
    let hs = fresh(Tensor::stack(&states, 0)?)?;

    xp.apply_op2(w_hh, RnnOp { hs })
}

fn gru_fused(xp: &Tensor, w_hh: &Tensor, b_hh: &Tensor) -> candle_core::Result<Tensor> {
    let (n_steps, b, h3) = xp.dims3()?;
    let h = h3 / 3;
    let xs = xp.detach().contiguous()?;
    let wt = w_hh.detach().t()?.contiguous()?;
    let bias = b_hh.detach();

    let mut state = Tensor::zeros((b, h), xp.dtype(), xp.device())?;
    let mut states = Vec::with_capacity(n_steps);
    let mut rzs = Vec::with_capacity(n_steps);
    let mut hns = Vec::with_capacity(n_steps);
    let mut ns = Vec::with_capacity(n_steps);
    for t in 0..n_steps {
        let x_t = xs.i(t)?;
        let hp = state.matmul(&wt)?.broadcast_add(&bias)?;
        let rz = candle_nn::ops::sigmoid(&(x_t.narrow(1, 0, 2 * h)? + hp.narrow(1, 0, 2 * h)?)?)?;
        let hn = hp.narrow(1, 2 * h, h)?;
        let n = (x_t.narrow(1, 2 * h, h)? + (rz.narrow(1, 0, h)? * &hn)?)?.tanh()?;
        state = (&n + (rz.narrow(1, h, h)? * (&state - &n)?)?)?;
        states.push(state.clone());
        rzs.push(rz);
        hns.push(hn);
        ns.push(n);
    }

    let op = GruOp {
        hs: fresh(Tensor::stack(&states, 0)?)?,
        rz: Tensor::stack(&rzs, 0)?,
        hn: Tensor::stack(&hns, 0)?,
        n: Tensor::stack(&ns, 0)?,
    };
    xp.apply_op3(w_hh, b_hh, op)
}

/// The hidden states before each step: zeros, then `hs[..T-1]`; `(T, B, H)`.
fn previous_states(hs: &Tensor) -> candle_core::Result<Tensor> {
    let (n_steps, b, h) = hs.dims3()?;
    let h0 = Tensor::zeros((1, b, h), hs.dtype(), hs.device())?;
    if n_steps == 1 {
        return Ok(h0);
    }
    Tensor::cat(&[&h0, &hs.narrow(0, 0, n_steps - 1)?], 0)
}

/// The SimpleRNN op: forward returns the saved states; backward is BPTT.
struct RnnOp {
    /// Hidden states computed on detached inputs, `(T, B, H)`.
    hs: Tensor,
}

impl CustomOp2 for RnnOp {
    fn name(&self) -> &'static str {
        "fused-simple-rnn"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_result(&self.hs)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        cuda_result(&self.hs)
    }

    fn bwd(
        &self,
        _xp: &Tensor,
        w_hh: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n_steps, b, h) = self.hs.dims3()?;
        let grad = grad.detach().contiguous()?;
        let w = w_hh.detach();
        let dtanh = (1.0 - self.hs.sqr()?)?;

        // dL/d(pre-activation) per step, newest first.
        let mut carry = Tensor::zeros((b, h), grad.dtype(), grad.device())?;
        let mut das = Vec::with_capacity(n_steps);
        for t in (0..n_steps).rev() {
            let dh = (grad.i(t)? + &carry)?;
            let da = (dh * dtanh.i(t)?)?;
            carry = da.matmul(&w)?;
            das.push(da);
        }
        das.reverse();
        let da = Tensor::stack(&das, 0)?;

        let prev = previous_states(&self.hs)?.reshape((n_steps * b, h))?;
        let dw = da.reshape((n_steps * b, h))?.t()?.matmul(&prev)?;
        Ok((Some(da), Some(dw)))
    }
}

/// The GRU op: forward returns the saved states; backward is BPTT.
struct GruOp {
    /// Hidden states, `(T, B, H)`.
    hs: Tensor,
    /// Reset and update gates, `(T, B, 2H)`.
    rz: Tensor,
    /// Recurrent candidate projection `h W_hn^T + b_hn`, `(T, B, H)`.
    hn: Tensor,
    /// Candidate state, `(T, B, H)`.
    n: Tensor,
}

impl CustomOp3 for GruOp {
    fn name(&self) -> &'static str {
        "fused-gru"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_result(&self.hs)
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        cuda_result(&self.hs)
    }

    fn bwd(
        &self,
        _xp: &Tensor,
        w_hh: &Tensor,
        _b_hh: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (n_steps, b, h) = self.hs.dims3()?;
        let grad = grad.detach().contiguous()?;
        let w = w_hh.detach();

        // Everything that does not depend on the carried gradient, for all
        // steps at once:
        //   d(n pre-activation) = dh * (1 - z) * (1 - n^2)         =: dh * a
        //   d(z pre-activation) = dh * (h_prev - n) * z * (1 - z)  =: dh * c
        //   d(r pre-activation) = dn_pre * hn * r * (1 - r)        =: dn_pre * e
        //   d(hn)               = dn_pre * r
        let r = self.rz.narrow(2, 0, h)?.contiguous()?;
        let z = self.rz.narrow(2, h, h)?.contiguous()?;
        let prev = previous_states(&self.hs)?;
        let one_minus_z = (1.0 - &z)?;
        let a = (&one_minus_z * (1.0 - self.n.sqr()?)?)?;
        let c = ((&prev - &self.n)? * (&z * &one_minus_z)?)?;
        let e = (&self.hn * (&r * (1.0 - &r)?)?)?;

        let mut carry = Tensor::zeros((b, h), grad.dtype(), grad.device())?;
        let mut dhps = Vec::with_capacity(n_steps);
        let mut dns = Vec::with_capacity(n_steps);
        for t in (0..n_steps).rev() {
            let dh = (grad.i(t)? + &carry)?;
            let dn = (&dh * a.i(t)?)?;
            let dz = (&dh * c.i(t)?)?;
            let dr = (&dn * e.i(t)?)?;
            let dhn = (&dn * r.i(t)?)?;
            let dhp = Tensor::cat(&[&dr, &dz, &dhn], 1)?;
            carry = ((dh * z.i(t)?)? + dhp.matmul(&w)?)?;
            dhps.push(dhp);
            dns.push(dn);
        }
        dhps.reverse();
        dns.reverse();
        let dhp = Tensor::stack(&dhps, 0)?;
        let dn = Tensor::stack(&dns, 0)?;

        let dxp = Tensor::cat(&[&dhp.narrow(2, 0, 2 * h)?, &dn], 2)?;
        let flat = dhp.reshape((n_steps * b, 3 * h))?;
        let dw = flat.t()?.matmul(&prev.reshape((n_steps * b, h))?)?;
        let db = sum_rows(&flat)?;
        Ok((Some(dxp), Some(dw), Some(db)))
    }
}
