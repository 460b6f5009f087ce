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

use std::ops::Range;

use candle_core::{CpuStorage, CudaStorage, CustomOp2, CustomOp3, Layout, Shape};
use candle_core::{IndexOp, Tensor};

use rayon::prelude::*;

use crate::cpu::{
    gemm_into, has_kernels, matmul, simd, simd_dispatch, with_slices, Gemm, Handover, Mat, MatMut,
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
    if has_kernels(xp) {
        rnn_cpu(xp, w_hh)
    } else {
        rnn_ops(xp, w_hh)
    }
}

fn gru_fused(xp: &Tensor, w_hh: &Tensor, b_hh: &Tensor) -> candle_core::Result<Tensor> {
    if has_kernels(xp) {
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
    let hs = with_slices(&[&xs, &w], |s| {
        let (x, w) = (s[0], s[1]);
        let blocks: Vec<(Range<usize>, Vec<f32>)> = row_blocks(b)
            .into_par_iter()
            .map(|rows| {
                let mut hs = vec![0f32; n_steps * rows.len() * h];
                simd_dispatch!(
                    rnn_forward,
                    rnn_forward_avx2(x, w, &mut hs, dims, rows.clone())
                );
                (rows, hs)
            })
            .collect();
        Ok(gather(blocks.iter().map(|(r, v)| (r, &v[..])), dims, h))
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
    let mut blocks = with_slices(&[&xs, &w, &bias], |s| {
        let (x, w, bias) = (s[0], s[1], s[2]);
        Ok(row_blocks(b)
            .into_par_iter()
            .map(|rows| simd_dispatch!(gru_forward, gru_forward_avx2(x, w, bias, dims, rows)))
            .collect::<Vec<GruBlock>>())
    })?;
    let hs = gather(blocks.iter().map(|k| (&k.rows, &k.hs[..])), dims, dims.h);
    for block in &mut blocks {
        // The backward reads the states from the op's result instead.
        block.hs = Vec::new();
    }
    let hs = Handover::new(hs, (n_steps, b, dims.h));
    xp.apply_op3(w_hh, b_hh, GruCpuOp { hs, blocks, dims })
}

/// Sizes of a recurrence: steps, batch, units.
#[derive(Debug, Clone, Copy)]
struct Steps {
    n_steps: usize,
    b: usize,
    h: usize,
}

/// Rows of the batch per block of a recurrence (the last block may be
/// shorter).
const BLOCK_ROWS: usize = 32;

/// The batch rows, split into contiguous blocks of [`BLOCK_ROWS`]. The rows
/// of a recurrence are independent, so rayon runs each block's steps on one
/// thread, without synchronising per step. The blocks do not depend on the
/// thread count, and neither do the results: the GEMM rounds a block's rows
/// differently for another row count, so splitting by thread count made
/// seeded GRU results depend on the machine's cores.
fn row_blocks(b: usize) -> Vec<Range<usize>> {
    (0..b)
        .step_by(BLOCK_ROWS)
        .map(|start| start..(start + BLOCK_ROWS).min(b))
        .collect()
}

/// Interleaves per-block `(T, rows, width)` buffers into one `(T, B,
/// width)` buffer.
fn gather<'a>(
    blocks: impl Iterator<Item = (&'a Range<usize>, &'a [f32])> + Clone,
    dims: Steps,
    width: usize,
) -> Vec<f32> {
    let mut out = vec![0f32; dims.n_steps * dims.b * width];
    for (rows, part) in blocks {
        let n = rows.len() * width;
        for t in 0..dims.n_steps {
            out[(t * dims.b + rows.start) * width..][..n].copy_from_slice(&part[t * n..][..n]);
        }
    }
    out
}

/// The rows `rows` of step `t` of a `(T, B, width)` buffer.
fn step_rows<'a>(
    x: &'a [f32],
    t: usize,
    rows: &Range<usize>,
    dims: Steps,
    width: usize,
) -> &'a [f32] {
    &x[(t * dims.b + rows.start) * width..][..rows.len() * width]
}

/// `hs[t] = tanh(x[t] + hs[t-1] W^T)` for the batch rows `rows`: `x` is
/// the whole `(T, B, H)` input, `hs` this block's `(T, rows, H)` states,
/// `w` is `(H, H)`.
#[inline(always)]
fn rnn_forward(x: &[f32], w: &[f32], hs: &mut [f32], dims: Steps, rows: Range<usize>) {
    let (h, bk) = (dims.h, rows.len());
    let blk = bk * h;
    for t in 0..dims.n_steps {
        let (before, rest) = hs.split_at_mut(t * blk);
        let cur = &mut rest[..blk];
        cur.copy_from_slice(step_rows(x, t, &rows, dims, h));
        if t > 0 {
            gemm_into(
                MatMut::new(cur, bk, h, h, 1),
                Mat::new(&before[(t - 1) * blk..], bk, h, h, 1),
                Mat::new(w, h, h, 1, h),
                Gemm {
                    accumulate: true,
                    ..Gemm::default()
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
unsafe fn rnn_forward_avx2(x: &[f32], w: &[f32], hs: &mut [f32], dims: Steps, rows: Range<usize>) {
    rnn_forward(x, w, hs, dims, rows)
}

/// BPTT of [`rnn_forward`] for the batch rows `rows`: `grad` and `hs` are
/// whole `(T, B, H)` buffers; returns this block's `(T, rows, H)`
/// pre-activation gradients.
#[inline(always)]
fn rnn_backward(grad: &[f32], hs: &[f32], w: &[f32], dims: Steps, rows: Range<usize>) -> Vec<f32> {
    let (h, bk) = (dims.h, rows.len());
    let blk = bk * h;
    let mut da = vec![0f32; dims.n_steps * blk];
    let mut carry = vec![0f32; blk];
    for t in (0..dims.n_steps).rev() {
        let cur = &mut da[t * blk..(t + 1) * blk];
        let g = step_rows(grad, t, &rows, dims, h);
        let y = step_rows(hs, t, &rows, dims, h);
        for (((a, &g), &c), &y) in cur.iter_mut().zip(g).zip(&carry).zip(y) {
            *a = (g + c) * (1.0 - y * y);
        }
        if t > 0 {
            matmul(
                MatMut::new(&mut carry, bk, h, h, 1),
                Mat::new(cur, bk, h, h, 1),
                Mat::new(w, h, h, h, 1),
            );
        }
    }
    da
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rnn_backward_avx2(
    grad: &[f32],
    hs: &[f32],
    w: &[f32],
    dims: Steps,
    rows: Range<usize>,
) -> Vec<f32> {
    rnn_backward(grad, hs, w, dims, rows)
}

/// `dW = sum over t >= 1 of dpre[t]^T hs[t-1]`: one `(G, (T-1) B) x ((T-1)
/// B, H)` product; `dpre` is `(T, B, G)` (step 0's previous state is zero).
fn weight_gradient(dpre: &[f32], hs: &[f32], dims: Steps, g: usize) -> Vec<f32> {
    let (b, h) = (dims.b, dims.h);
    let mut dw = vec![0f32; g * h];
    let rows = (dims.n_steps - 1) * b;
    if rows > 0 {
        gemm_into(
            MatMut::new(&mut dw, g, h, h, 1),
            Mat::new(&dpre[b * g..], g, rows, 1, g),
            Mat::new(hs, rows, h, h, 1),
            Gemm {
                parallel: true,
                ..Gemm::default()
            },
        );
    }
    dw
}

/// One block of batch rows of a GRU forward pass: what its backward pass
/// needs, each `(T, rows, H)`.
struct GruBlock {
    rows: Range<usize>,
    /// The states (gathered into the op's result, then dropped here).
    hs: Vec<f32>,
    r: Vec<f32>,
    z: Vec<f32>,
    /// `h W_hn^T + b_hn`.
    hn: Vec<f32>,
    n: Vec<f32>,
}

/// The GRU recurrence (module docs) for the batch rows `rows`: `x` is the
/// whole `(T, B, 3H)` input, `w` `(3H, H)`, `bias` `(3H)`.
#[inline(always)]
fn gru_forward(x: &[f32], w: &[f32], bias: &[f32], dims: Steps, rows: Range<usize>) -> GruBlock {
    let (h, bk) = (dims.h, rows.len());
    let (blk, g) = (bk * h, 3 * h);
    let size = dims.n_steps * blk;
    let mut out = GruBlock {
        rows: rows.clone(),
        hs: vec![0f32; size],
        r: vec![0f32; size],
        z: vec![0f32; size],
        hn: vec![0f32; size],
        n: vec![0f32; size],
    };
    let mut hp = vec![0f32; bk * g];
    let zeros = vec![0f32; blk];
    for t in 0..dims.n_steps {
        for row in hp.chunks_exact_mut(g) {
            row.copy_from_slice(bias);
        }
        let (before, rest) = out.hs.split_at_mut(t * blk);
        let prev = if t > 0 {
            let prev = &before[(t - 1) * blk..];
            gemm_into(
                MatMut::new(&mut hp, bk, g, g, 1),
                Mat::new(prev, bk, h, h, 1),
                Mat::new(w, h, g, 1, h),
                Gemm {
                    accumulate: true,
                    ..Gemm::default()
                },
            );
            &prev[..blk]
        } else {
            &zeros[..]
        };
        let at = t * blk..(t + 1) * blk;
        let cur = &mut rest[..blk];
        let (r, z) = (&mut out.r[at.clone()], &mut out.z[at.clone()]);
        let (hn, n) = (&mut out.hn[at.clone()], &mut out.n[at]);
        let xt = step_rows(x, t, &rows, dims, g);
        for bi in 0..bk {
            let xr = &xt[bi * g..][..g];
            let hr = &hp[bi * g..][..g];
            let u = bi * h..(bi + 1) * h;
            let units = r[u.clone()]
                .iter_mut()
                .zip(&mut z[u.clone()])
                .zip(&mut hn[u.clone()])
                .zip(&mut n[u.clone()])
                .zip(&mut cur[u.clone()])
                .zip(&prev[u]);
            for (j, (((((r, z), hn), n), y), &hprev)) in units.enumerate() {
                *r = simd::sigmoid(xr[j] + hr[j]);
                *z = simd::sigmoid(xr[h + j] + hr[h + j]);
                *hn = hr[2 * h + j];
                *n = simd::tanh(xr[2 * h + j] + *r * *hn);
                *y = *n + *z * (hprev - *n);
            }
        }
    }
    out
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gru_forward_avx2(
    x: &[f32],
    w: &[f32],
    bias: &[f32],
    dims: Steps,
    rows: Range<usize>,
) -> GruBlock {
    gru_forward(x, w, bias, dims, rows)
}

/// BPTT of [`gru_forward`] for one block: `grad` and `hs` are whole `(T,
/// B, H)` buffers. Returns the block's `(T, rows, 3H)` gradients of the
/// recurrent projection (for `dW` and `db`) and of the input projection;
/// see [`GruOp::bwd`] for the equations.
#[inline(always)]
fn gru_backward(
    grad: &[f32],
    hs: &[f32],
    block: &GruBlock,
    w: &[f32],
    dims: Steps,
) -> (Vec<f32>, Vec<f32>) {
    let rows = &block.rows;
    let (h, bk) = (dims.h, rows.len());
    let (blk, g) = (bk * h, 3 * h);
    let mut dhp = vec![0f32; dims.n_steps * bk * g];
    let mut dx = vec![0f32; dims.n_steps * bk * g];
    let mut carry = vec![0f32; blk];
    let zeros = vec![0f32; blk];
    for t in (0..dims.n_steps).rev() {
        let at = t * blk..(t + 1) * blk;
        let prev = if t > 0 {
            step_rows(hs, t - 1, rows, dims, h)
        } else {
            &zeros[..]
        };
        let gr = step_rows(grad, t, rows, dims, h);
        let (r, z) = (&block.r[at.clone()], &block.z[at.clone()]);
        let (hn, n) = (&block.hn[at.clone()], &block.n[at]);
        let dhp_t = &mut dhp[t * bk * g..(t + 1) * bk * g];
        let dx_t = &mut dx[t * bk * g..(t + 1) * bk * g];
        for bi in 0..bk {
            let u0 = bi * h;
            let (dhp_row, dx_row) = (&mut dhp_t[bi * g..][..g], &mut dx_t[bi * g..][..g]);
            let (dr_h, rest) = dhp_row.split_at_mut(h);
            let (dz_h, dhn_h) = rest.split_at_mut(h);
            let (dr_x, rest) = dx_row.split_at_mut(h);
            let (dz_x, dn_x) = rest.split_at_mut(h);
            for j in 0..h {
                let k = u0 + j;
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
                MatMut::new(&mut carry, bk, h, h, 1),
                Mat::new(dhp_t, bk, g, g, 1),
                Mat::new(w, g, h, h, 1),
                Gemm {
                    accumulate: true,
                    ..Gemm::default()
                },
            );
        }
    }
    (dhp, dx)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gru_backward_avx2(
    grad: &[f32],
    hs: &[f32],
    block: &GruBlock,
    w: &[f32],
    dims: Steps,
) -> (Vec<f32>, Vec<f32>) {
    gru_backward(grad, hs, block, w, dims)
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
            let (grad, hs, w) = (s[0], s[1], s[2]);
            let blocks: Vec<(Range<usize>, Vec<f32>)> = row_blocks(dims.b)
                .into_par_iter()
                .map(|rows| {
                    let da = simd_dispatch!(
                        rnn_backward,
                        rnn_backward_avx2(grad, hs, w, dims, rows.clone())
                    );
                    (rows, da)
                })
                .collect();
            let da = gather(blocks.iter().map(|(r, v)| (r, &v[..])), dims, dims.h);
            let dw = weight_gradient(&da, hs, dims, dims.h);
            Ok((da, dw))
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
    /// Gates and candidates, per block of batch rows.
    blocks: Vec<GruBlock>,
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
        let dims = self.dims;
        let g = 3 * dims.h;
        let (dx, dw, db) = with_slices(&[&grad, &hs.detach(), &w], |s| {
            let (grad, hs, w) = (s[0], s[1], s[2]);
            let parts: Vec<(Vec<f32>, Vec<f32>)> = self
                .blocks
                .par_iter()
                .map(|block| {
                    simd_dispatch!(gru_backward, gru_backward_avx2(grad, hs, block, w, dims))
                })
                .collect();
            let rows = self.blocks.iter().map(|k| &k.rows);
            let dhp = gather(rows.clone().zip(parts.iter().map(|p| &p.0[..])), dims, g);
            let dx = gather(rows.zip(parts.iter().map(|p| &p.1[..])), dims, g);
            let dw = weight_gradient(&dhp, hs, dims, g);
            let mut db = vec![0f32; g];
            for row in dhp.chunks_exact(g) {
                for (d, &x) in db.iter_mut().zip(row) {
                    *d += x;
                }
            }
            Ok((dx, dw, db))
        })?;
        let device = xp.device();
        Ok((
            Some(Tensor::from_vec(dx, xp.shape(), device)?),
            Some(Tensor::from_vec(dw, w_hh.shape(), device)?),
            Some(Tensor::from_vec(db, b_hh.shape(), device)?),
        ))
    }
}
