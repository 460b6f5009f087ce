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
//! On the CPU, steps 2 and 3 are plain loops over slices
//! ([`crate::cpu`]): one GEMM per step (the recurrent product, written
//! into a preallocated buffer), the gate arithmetic in one vectorised pass,
//! and no tensor, allocation or graph node per step. Elsewhere the
//! recurrence runs as detached tensor ops and the op only copies the
//! finished tensor in its forward (the pattern of [`crate::ops`]), so it
//! runs on any device whose storage can be cloned (CUDA).
//!
//! FIXME(#5): the CUDA path of these ops has not run on a GPU yet (the
//! CPU tests run its tensor-op version, `rnn_ops` / `gru_ops`, against
//! [`Recurrence::Composed`]); a test on a GPU should do the same there.
//!
//! The plain per-step composition is kept as [`Recurrence::Composed`];
//! tests check that all three give the same values and gradients.
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
use candle_core::{DType, IndexOp, Tensor};

use crate::cpu::{
    gemm_into, matmul, simd, simd_dispatch, with_slices, Gemm, Handover, Mat, MatMut,
};
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
    if xp.device().is_cpu() && xp.dtype() == DType::F32 {
        rnn_cpu(xp, w_hh)
    } else {
        rnn_ops(xp, w_hh)
    }
}

fn gru_fused(xp: &Tensor, w_hh: &Tensor, b_hh: &Tensor) -> candle_core::Result<Tensor> {
    if xp.device().is_cpu() && xp.dtype() == DType::F32 {
        gru_cpu(xp, w_hh, b_hh)
    } else {
        gru_ops(xp, w_hh, b_hh)
    }
}

/// The fused SimpleRNN from device-generic tensor ops (CUDA).
pub(crate) fn rnn_ops(xp: &Tensor, w_hh: &Tensor) -> candle_core::Result<Tensor> {
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

/// The fused GRU from device-generic tensor ops (CUDA).
pub(crate) fn gru_ops(xp: &Tensor, w_hh: &Tensor, b_hh: &Tensor) -> candle_core::Result<Tensor> {
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

/// SimpleRNN on the CPU: one GEMM per step and plain loops, no graph.
fn rnn_cpu(xp: &Tensor, w_hh: &Tensor) -> candle_core::Result<Tensor> {
    let (n_steps, b, h) = xp.dims3()?;
    let dims = Steps { n_steps, b, h };
    let xs = xp.detach().contiguous()?;
    let w = w_hh.detach().contiguous()?;
    let mut hs = vec![0f32; n_steps * b * h];
    with_slices(&[&xs, &w], |s| {
        simd_dispatch!(rnn_forward, rnn_forward_avx2(s[0], s[1], &mut hs, dims));
        Ok(())
    })?;
    let hs = Handover::new(hs, (n_steps, b, h));
    xp.apply_op2(w_hh, RnnCpuOp { hs, dims })
}

/// GRU on the CPU: one GEMM per step and plain loops, no graph.
fn gru_cpu(xp: &Tensor, w_hh: &Tensor, b_hh: &Tensor) -> candle_core::Result<Tensor> {
    let (n_steps, b, h3) = xp.dims3()?;
    let dims = Steps {
        n_steps,
        b,
        h: h3 / 3,
    };
    let xs = xp.detach().contiguous()?;
    let w = w_hh.detach().contiguous()?;
    let bias = b_hh.detach().contiguous()?;
    let n = n_steps * b * dims.h;
    let mut saved = GruSaved {
        hs: vec![0f32; n],
        r: vec![0f32; n],
        z: vec![0f32; n],
        hn: vec![0f32; n],
        n: vec![0f32; n],
    };
    with_slices(&[&xs, &w, &bias], |s| {
        simd_dispatch!(
            gru_forward,
            gru_forward_avx2(s[0], s[1], s[2], &mut saved, dims)
        );
        Ok(())
    })?;
    let hs = Handover::new(std::mem::take(&mut saved.hs), (n_steps, b, dims.h));
    xp.apply_op3(w_hh, b_hh, GruCpuOp { hs, saved, dims })
}

/// Sizes of a recurrence: steps, batch, units.
#[derive(Debug, Clone, Copy)]
struct Steps {
    n_steps: usize,
    b: usize,
    h: usize,
}

impl Steps {
    /// Elements of one step's `(B, H)` block.
    fn block(&self) -> usize {
        self.b * self.h
    }
}

/// `hs[t] = tanh(x[t] + hs[t-1] W^T)`, all `(B, H)`; `w` is `(H, H)`.
#[inline(always)]
fn rnn_forward(x: &[f32], w: &[f32], hs: &mut [f32], dims: Steps) {
    let (bh, h) = (dims.block(), dims.h);
    for t in 0..dims.n_steps {
        let (before, rest) = hs.split_at_mut(t * bh);
        let cur = &mut rest[..bh];
        cur.copy_from_slice(&x[t * bh..(t + 1) * bh]);
        if t > 0 {
            gemm_into(
                MatMut::new(cur, dims.b, h, h, 1),
                Mat::new(&before[(t - 1) * bh..], dims.b, h, h, 1),
                Mat::new(w, h, h, 1, h),
                Gemm {
                    accumulate: true,
                    parallel: false,
                },
            );
        }
        for v in cur.iter_mut() {
            *v = simd::tanh(*v);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rnn_forward_avx2(x: &[f32], w: &[f32], hs: &mut [f32], dims: Steps) {
    rnn_forward(x, w, hs, dims)
}

/// BPTT of [`rnn_forward`]: returns `(dx, dW)`.
#[inline(always)]
fn rnn_backward(grad: &[f32], hs: &[f32], w: &[f32], dims: Steps) -> (Vec<f32>, Vec<f32>) {
    let (bh, h) = (dims.block(), dims.h);
    let mut da = vec![0f32; dims.n_steps * bh];
    let mut carry = vec![0f32; bh];
    for t in (0..dims.n_steps).rev() {
        let cur = &mut da[t * bh..(t + 1) * bh];
        let (g, hs_t) = (&grad[t * bh..(t + 1) * bh], &hs[t * bh..(t + 1) * bh]);
        for (((a, &g), &c), &y) in cur.iter_mut().zip(g).zip(&carry).zip(hs_t) {
            *a = (g + c) * (1.0 - y * y);
        }
        if t > 0 {
            matmul(
                MatMut::new(&mut carry, dims.b, h, h, 1),
                Mat::new(cur, dims.b, h, h, 1),
                Mat::new(w, h, h, h, 1),
            );
        }
    }
    let mut dw = vec![0f32; h * h];
    weight_gradient(&da, hs, &mut dw, dims, h);
    (da, dw)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rnn_backward_avx2(
    grad: &[f32],
    hs: &[f32],
    w: &[f32],
    dims: Steps,
) -> (Vec<f32>, Vec<f32>) {
    rnn_backward(grad, hs, w, dims)
}

/// `dW = sum over t >= 1 of dpre[t]^T hs[t-1]`: one `(G, (T-1) B) x ((T-1)
/// B, H)` product; `dpre` is `(T, B, G)` (step 0's previous state is zero).
fn weight_gradient(dpre: &[f32], hs: &[f32], dw: &mut [f32], dims: Steps, g: usize) {
    let (b, h) = (dims.b, dims.h);
    let rows = (dims.n_steps - 1) * b;
    if rows == 0 {
        return;
    }
    gemm_into(
        MatMut::new(dw, g, h, h, 1),
        Mat::new(&dpre[b * g..], g, rows, 1, g),
        Mat::new(hs, rows, h, h, 1),
        Gemm {
            accumulate: false,
            parallel: true,
        },
    );
}

/// What the GRU's backward pass needs, each `(T, B, H)`.
struct GruSaved {
    /// The states; moved into the op's result before the backward pass.
    hs: Vec<f32>,
    r: Vec<f32>,
    z: Vec<f32>,
    /// `h W_hn^T + b_hn`.
    hn: Vec<f32>,
    n: Vec<f32>,
}

/// The GRU recurrence (module docs) on slices: `x` `(T, B, 3H)`, `w` `(3H,
/// H)`, `bias` `(3H)`.
#[inline(always)]
fn gru_forward(x: &[f32], w: &[f32], bias: &[f32], saved: &mut GruSaved, dims: Steps) {
    let (b, h) = (dims.b, dims.h);
    let bh = dims.block();
    let mut hp = vec![0f32; b * 3 * h];
    let zeros = vec![0f32; bh];
    for t in 0..dims.n_steps {
        for row in hp.chunks_exact_mut(3 * h) {
            row.copy_from_slice(bias);
        }
        let (before, rest) = saved.hs.split_at_mut(t * bh);
        let prev = if t > 0 {
            let prev = &before[(t - 1) * bh..];
            gemm_into(
                MatMut::new(&mut hp, b, 3 * h, 3 * h, 1),
                Mat::new(prev, b, h, h, 1),
                Mat::new(w, h, 3 * h, 1, h),
                Gemm {
                    accumulate: true,
                    parallel: false,
                },
            );
            &prev[..bh]
        } else {
            &zeros[..]
        };
        let at = t * bh..(t + 1) * bh;
        let cur = &mut rest[..bh];
        let (r, z) = (&mut saved.r[at.clone()], &mut saved.z[at.clone()]);
        let (hn, n) = (&mut saved.hn[at.clone()], &mut saved.n[at]);
        for bi in 0..b {
            let xr = &x[(t * b + bi) * 3 * h..][..3 * h];
            let hr = &hp[bi * 3 * h..][..3 * h];
            let u = bi * h..(bi + 1) * h;
            let rows = r[u.clone()]
                .iter_mut()
                .zip(&mut z[u.clone()])
                .zip(&mut hn[u.clone()])
                .zip(&mut n[u.clone()])
                .zip(&mut cur[u.clone()])
                .zip(&prev[u]);
            for (j, (((((r, z), hn), n), y), &hprev)) in rows.enumerate() {
                *r = simd::sigmoid(xr[j] + hr[j]);
                *z = simd::sigmoid(xr[h + j] + hr[h + j]);
                *hn = hr[2 * h + j];
                *n = simd::tanh(xr[2 * h + j] + *r * *hn);
                *y = *n + *z * (hprev - *n);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gru_forward_avx2(x: &[f32], w: &[f32], bias: &[f32], saved: &mut GruSaved, dims: Steps) {
    gru_forward(x, w, bias, saved, dims)
}

/// BPTT of [`gru_forward`]: returns `(dx, dW, db)`; see [`GruOp::bwd`] for
/// the equations.
#[inline(always)]
fn gru_backward(
    grad: &[f32],
    hs: &[f32],
    saved: &GruSaved,
    w: &[f32],
    dims: Steps,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (b, h) = (dims.b, dims.h);
    let bh = dims.block();
    let g = 3 * h;
    let mut dhp = vec![0f32; dims.n_steps * b * g];
    let mut dx = vec![0f32; dims.n_steps * b * g];
    let mut carry = vec![0f32; bh];
    let zeros = vec![0f32; bh];
    for t in (0..dims.n_steps).rev() {
        let at = t * bh..(t + 1) * bh;
        let prev = if t > 0 {
            &hs[(t - 1) * bh..t * bh]
        } else {
            &zeros[..]
        };
        let (gr, r, z) = (
            &grad[at.clone()],
            &saved.r[at.clone()],
            &saved.z[at.clone()],
        );
        let (hn, n) = (&saved.hn[at.clone()], &saved.n[at]);
        let dhp_t = &mut dhp[t * b * g..(t + 1) * b * g];
        let dx_t = &mut dx[t * b * g..(t + 1) * b * g];
        for bi in 0..b {
            let u = bi * h..(bi + 1) * h;
            let (dhp_row, dx_row) = (&mut dhp_t[bi * g..][..g], &mut dx_t[bi * g..][..g]);
            let (dr_h, rest) = dhp_row.split_at_mut(h);
            let (dz_h, dhn_h) = rest.split_at_mut(h);
            let (dr_x, rest) = dx_row.split_at_mut(h);
            let (dz_x, dn_x) = rest.split_at_mut(h);
            for j in 0..h {
                let k = u.start + j;
                let dh = gr[k] + carry[k];
                let (r, z, n, hn) = (r[k], z[k], n[k], hn[k]);
                let dn = dh * (1.0 - z) * (1.0 - n * n);
                let dz = dh * (prev[k] - n) * z * (1.0 - z);
                let dr = dn * hn * r * (1.0 - r);
                dr_h[j] = dr;
                dz_h[j] = dz;
                dhn_h[j] = dn * r;
                dr_x[j] = dr;
                dz_x[j] = dz;
                dn_x[j] = dn;
                carry[k] = dh * z;
            }
        }
        if t > 0 {
            gemm_into(
                MatMut::new(&mut carry, b, h, h, 1),
                Mat::new(dhp_t, b, g, g, 1),
                Mat::new(w, g, h, h, 1),
                Gemm {
                    accumulate: true,
                    parallel: false,
                },
            );
        }
    }
    let mut dw = vec![0f32; g * h];
    weight_gradient(&dhp, hs, &mut dw, dims, g);
    let mut db = vec![0f32; g];
    for row in dhp.chunks_exact(g) {
        for (d, &x) in db.iter_mut().zip(row) {
            *d += x;
        }
    }
    (dx, dw, db)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gru_backward_avx2(
    grad: &[f32],
    hs: &[f32],
    saved: &GruSaved,
    w: &[f32],
    dims: Steps,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    gru_backward(grad, hs, saved, w, dims)
}

/// The SimpleRNN op of the CPU path: forward hands over the states
/// computed by [`rnn_forward`]; backward is [`rnn_backward`].
struct RnnCpuOp {
    hs: Handover,
    dims: Steps,
}

impl CustomOp2 for RnnCpuOp {
    fn name(&self) -> &'static str {
        "fused-simple-rnn-cpu"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.hs.take()
    }

    fn bwd(
        &self,
        xp: &Tensor,
        w_hh: &Tensor,
        hs: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        let w = w_hh.detach().contiguous()?;
        let dims = self.dims;
        let (da, dw) = with_slices(&[&grad, &hs.detach(), &w], |s| {
            Ok(simd_dispatch!(
                rnn_backward,
                rnn_backward_avx2(s[0], s[1], s[2], dims)
            ))
        })?;
        Ok((
            Some(Tensor::from_vec(da, xp.shape(), xp.device())?),
            Some(Tensor::from_vec(dw, w_hh.shape(), xp.device())?),
        ))
    }
}

/// The GRU op of the CPU path: forward hands over the states computed by
/// [`gru_forward`]; backward is [`gru_backward`].
struct GruCpuOp {
    hs: Handover,
    /// Gates and candidates.
    saved: GruSaved,
    dims: Steps,
}

impl CustomOp3 for GruCpuOp {
    fn name(&self) -> &'static str {
        "fused-gru-cpu"
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
        self.hs.take()
    }

    fn bwd(
        &self,
        xp: &Tensor,
        w_hh: &Tensor,
        b_hh: &Tensor,
        hs: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        let w = w_hh.detach().contiguous()?;
        let (dx, dw, db) = with_slices(&[&grad, &hs.detach(), &w], |s| {
            Ok(simd_dispatch!(
                gru_backward,
                gru_backward_avx2(s[0], s[1], &self.saved, s[2], self.dims)
            ))
        })?;
        let device = xp.device();
        Ok((
            Some(Tensor::from_vec(dx, xp.shape(), device)?),
            Some(Tensor::from_vec(dw, w_hh.shape(), device)?),
            Some(Tensor::from_vec(db, b_hh.shape(), device)?),
        ))
    }
}
