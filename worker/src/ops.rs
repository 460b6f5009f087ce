//! Differentiable ops whose plain candle composition is slow on the CPU.
//!
//! candle's backward of a broadcast sums the gradient over the broadcast
//! dimensions; when those are the leading ones (a bias added to every row,
//! a layer-norm scale), its CPU reduction takes a slow per-element path that
//! cost about 15 % of a GRU training step. The ops here compute such sums as
//! one matmul with a row of ones instead.
//!
//! The softmax, the layer norm and the bias + ELU are here for a related
//! reason: their composed backward passes make many passes over large
//! tensors, where a hand-written one makes one to three.
//!
//! Each op comes in two forms. On the CPU (f32) the forward and backward
//! are plain loops over the tensors' slices ([`crate::cpu`]) and the result
//! is handed to candle without a copy. Elsewhere the result is computed on
//! detached tensors with ordinary (device-generic) ops and wrapped in a
//! custom op whose forward hands the finished tensor back and whose
//! backward is written with tensor ops; nothing device-specific is needed
//! beyond cloning a storage, so CUDA works too. Tests check both forms
//! against the plain composition.

use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Storage,
};
use candle_core::{Tensor, D};

use crate::cpu::{has_kernels, simd, simd_dispatch, with_slices, Handover};

/// Copies a finished CPU tensor out as a custom op's result. `t` must be a
/// fresh f32 result of an op: contiguous, offset 0, exactly as large as its
/// storage.
pub(crate) fn cpu_result(t: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(s) = &*storage else {
        candle_core::bail!("fused op: saved result is not on the CPU")
    };
    let len = s.as_slice::<f32>()?.len();
    if !layout.is_contiguous() || layout.start_offset() != 0 || layout.shape().elem_count() != len {
        candle_core::bail!("fused op: saved result is not a fresh tensor")
    }
    Ok((s.clone(), layout.shape().clone()))
}

/// Copies a finished CUDA tensor out as a custom op's result (same
/// requirements as [`cpu_result`]).
pub(crate) fn cuda_result(t: &Tensor) -> candle_core::Result<(CudaStorage, Shape)> {
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
        _ => candle_core::bail!("fused op: saved result is not on a CUDA device"),
    }
}

/// A tensor that is certainly fresh: ops that may return a view of their
/// input (reshape, a one-element stack) are followed by a copy.
pub(crate) fn fresh(t: Tensor) -> candle_core::Result<Tensor> {
    let (storage, layout) = t.storage_and_layout();
    let is_fresh = match &*storage {
        Storage::Cpu(s) => {
            layout.is_contiguous()
                && layout.start_offset() == 0
                && s.as_slice::<f32>()
                    .is_ok_and(|v| v.len() == layout.shape().elem_count())
        }
        // Only the CPU check is exact; elsewhere copy to be sure.
        _ => false,
    };
    drop(storage);
    if is_fresh {
        Ok(t)
    } else {
        t.copy()
    }
}

/// A custom op's result, computed before the op is applied: a tensor on
/// any device (copied out by the op's forward), or a CPU kernel's buffer
/// (moved out).
pub(crate) enum Finished {
    Tensor(Tensor),
    Cpu(Handover),
}

impl Finished {
    fn cpu(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        match self {
            Finished::Tensor(t) => cpu_result(t),
            Finished::Cpu(h) => h.take(),
        }
    }

    fn cuda(&self) -> candle_core::Result<(CudaStorage, Shape)> {
        match self {
            Finished::Tensor(t) => cuda_result(t),
            Finished::Cpu(_) => candle_core::bail!("fused op: a CPU result on a CUDA device"),
        }
    }
}

/// Sums a gradient over all dimensions but the last: `(.., G)` -> `(G)`,
/// as `ones(1, N) @ x` (one matmul instead of a strided reduction).
pub fn sum_rows(x: &Tensor) -> candle_core::Result<Tensor> {
    let g = x.dim(D::Minus1)?;
    let n = x.elem_count() / g.max(1);
    let ones = Tensor::ones((1, n), x.dtype(), x.device())?;
    ones.matmul(&x.reshape((n, g))?)?.squeeze(0)
}

/// `x + b` with `b` broadcast over every row: `x` is `(.., G)`, `b` is
/// `(G)`. Same values and gradients as `x.broadcast_add(b)`.
pub fn add_bias(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !has_kernels(x) {
        let y = fresh(x.detach().broadcast_add(&b.detach())?)?;
        return x.apply_op2(b, AddBias(Finished::Tensor(y)));
    }
    let x = rows_of(x, b, "add_bias")?;
    let y = with_slices(&[&x.detach(), &b.detach()], |s| {
        let mut y = s[0].to_vec();
        for row in y.chunks_exact_mut(s[1].len()) {
            for (v, &b) in row.iter_mut().zip(s[1]) {
                *v += b;
            }
        }
        Ok(y)
    })?;
    let y = Finished::Cpu(Handover::new(y, x.shape()));
    x.apply_op2(b, AddBias(y))
}

/// `x` made contiguous after checking that its rows are as wide as `b`.
fn rows_of(x: &Tensor, b: &Tensor, op: &str) -> candle_core::Result<Tensor> {
    let g = b.dims1()?;
    if x.dim(D::Minus1)? != g {
        candle_core::bail!("{op}: rows of {:?} do not match a vector of {g}", x.dims())
    }
    x.contiguous()
}

/// `elu(x + b)` (alpha 1) with `b` `(G)` broadcast over every row of `x`
/// `(.., G)`: the same values and gradients as `add_bias(x, b)?.elu(1.0)`.
/// On the CPU it is one pass each way ([`BiasElu`]); candle's ELU backward
/// is about ten full-size tensor ops with an `exp` (a tenth of an rnn step
/// at L = 256, on the Conv1D output).
pub fn bias_elu(x: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if !has_kernels(x) {
        return add_bias(x, b)?.elu(1.0);
    }
    let x = rows_of(x, b, "bias_elu")?;
    let y = with_slices(&[&x.detach(), &b.detach()], |s| {
        let mut y = vec![0f32; s[0].len()];
        simd_dispatch!(bias_elu_rows, bias_elu_rows_avx2(s[0], s[1], &mut y));
        Ok(y)
    })?;
    let y = Handover::new(y, x.shape());
    x.apply_op2(b, BiasElu { y })
}

#[inline(always)]
fn bias_elu_rows(x: &[f32], b: &[f32], y: &mut [f32]) {
    for (y_row, x_row) in y.chunks_exact_mut(b.len()).zip(x.chunks_exact(b.len())) {
        for ((y, &x), &b) in y_row.iter_mut().zip(x_row).zip(b) {
            let p = x + b;
            let negative = simd::exp(p) - 1.0;
            *y = if p > 0.0 { p } else { negative };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn bias_elu_rows_avx2(x: &[f32], b: &[f32], y: &mut [f32]) {
    bias_elu_rows(x, b, y)
}

/// `y = elu(x + b)` on the CPU. Backward: the derivative of the ELU is 1
/// where `y > 0` and `e^(x + b) = y + 1` elsewhere (candle's convention at
/// 0 too).
struct BiasElu {
    y: Handover,
}

impl CustomOp2 for BiasElu {
    fn name(&self) -> &'static str {
        "bias-elu"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.y.take()
    }

    fn bwd(
        &self,
        x: &Tensor,
        _b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        let dpre = with_slices(&[&y.detach(), &grad], |s| {
            Ok(s[0]
                .iter()
                .zip(s[1])
                .map(|(&y, &g)| if y > 0.0 { g } else { g * (y + 1.0) })
                .collect::<Vec<f32>>())
        })?;
        let dpre = Tensor::from_vec(dpre, x.shape(), x.device())?;
        let db = sum_rows(&dpre)?;
        Ok((Some(dpre), Some(db)))
    }
}

/// Average pooling with window and stride `pool` along `dim` (0 or 1) of a
/// rank-3 tensor; trailing steps that do not fill a window are dropped
/// (Keras 'valid').
///
/// On the CPU it is one pass over the input each way ([`AvgPool`]).
/// Elsewhere it is a matmul with a `(T', T)` pooling matrix, so both
/// directions are one GEMM; that costs `T'` times the work, which made it a
/// tenth of a gru training step at L = 1024 on the CPU.
pub fn avg_pool(xs: &Tensor, dim: usize, pool: usize) -> candle_core::Result<Tensor> {
    let (a, b, c) = xs.dims3()?;
    if dim > 1 {
        candle_core::bail!("avg_pool: dim {dim} is not 0 or 1")
    }
    if pool == 1 {
        return Ok(xs.clone());
    }
    if has_kernels(xs) {
        let pooling = Pooling::along(xs.dims3()?, dim, pool);
        return xs.contiguous()?.apply_op1(AvgPool(pooling));
    }
    avg_pool_matmul(xs, dim, pool, (a, b, c))
}

fn avg_pool_matmul(
    xs: &Tensor,
    dim: usize,
    pool: usize,
    (a, b, c): (usize, usize, usize),
) -> candle_core::Result<Tensor> {
    let n = [a, b, c][dim];
    let kept = n / pool;
    let mut weights = vec![0f32; kept * n];
    for (row, chunk) in weights.chunks_mut(n).enumerate() {
        chunk[row * pool..(row + 1) * pool].fill(1.0 / pool as f32);
    }
    let p = Tensor::from_vec(weights, (kept, n), xs.device())?.to_dtype(xs.dtype())?;
    match dim {
        0 => p.matmul(&xs.reshape((a, b * c))?)?.reshape((kept, b, c)),
        _ => p.broadcast_left(a)?.matmul(&xs.contiguous()?),
    }
}

/// A pooling seen as `(outer, n, inner)`: windows of `pool` along `n`.
#[derive(Debug, Clone, Copy)]
struct Pooling {
    /// The pooled dimension of the rank-3 tensor.
    dim: usize,
    outer: usize,
    n: usize,
    inner: usize,
    pool: usize,
}

impl Pooling {
    fn along((a, b, c): (usize, usize, usize), dim: usize, pool: usize) -> Self {
        let (outer, n, inner) = if dim == 0 { (1, a, b * c) } else { (a, b, c) };
        Self {
            dim,
            outer,
            n,
            inner,
            pool,
        }
    }

    fn kept(&self) -> usize {
        self.n / self.pool
    }

    fn out_shape(&self, input: &Shape) -> Shape {
        let mut dims = input.dims().to_vec();
        dims[self.dim] = self.kept();
        Shape::from(dims)
    }
}

/// Average pooling on the CPU: the forward sums each window's rows, the
/// backward spreads each gradient row over its window (`1 / pool` each)
/// and leaves the dropped tail at zero.
struct AvgPool(Pooling);

impl CustomOp1 for AvgPool {
    fn name(&self) -> &'static str {
        "avg-pool"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Pooling {
            outer,
            n,
            inner,
            pool,
            ..
        } = self.0;
        let kept = self.0.kept();
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("avg-pool: input is not contiguous".into()))?;
        let x = &storage.as_slice::<f32>()?[start..end];
        let scale = 1.0 / pool as f32;
        let mut out = vec![0f32; outer * kept * inner];
        for (o, out) in out.chunks_exact_mut(kept * inner).enumerate() {
            let x = &x[o * n * inner..];
            for (w, row) in out.chunks_exact_mut(inner).enumerate() {
                for i in 0..pool {
                    let src = &x[(w * pool + i) * inner..][..inner];
                    for (y, &v) in row.iter_mut().zip(src) {
                        *y += v;
                    }
                }
                for y in row.iter_mut() {
                    *y *= scale;
                }
            }
        }
        Ok((CpuStorage::F32(out), self.0.out_shape(layout.shape())))
    }

    fn bwd(
        &self,
        xs: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let Pooling {
            outer,
            n,
            inner,
            pool,
            ..
        } = self.0;
        let kept = self.0.kept();
        let scale = 1.0 / pool as f32;
        let mut dx = vec![0f32; outer * n * inner];
        with_slices(&[&grad.detach().contiguous()?], |s| {
            for (o, dx) in dx.chunks_exact_mut(n * inner).enumerate() {
                let g = &s[0][o * kept * inner..][..kept * inner];
                for (w, g_row) in g.chunks_exact(inner).enumerate() {
                    for i in 0..pool {
                        let dst = &mut dx[(w * pool + i) * inner..][..inner];
                        for (d, &v) in dst.iter_mut().zip(g_row) {
                            *d = v * scale;
                        }
                    }
                }
            }
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dx, xs.shape(), xs.device())?))
    }
}

/// Layer normalisation over the last dimension, `(x - mean) / sqrt(var +
/// eps) * gamma + beta`, with a hand-written backward:
///
/// ```text
/// x_hat = (x - mean) * rstd,  g_hat = g * gamma
/// dx = rstd * (g_hat - mean(g_hat) - x_hat * mean(g_hat * x_hat))
/// dgamma = sum over rows of g * x_hat,  dbeta = sum over rows of g
/// ```
///
/// `x` is `(.., D)`; `gamma` and `beta` are `(D)`.
pub fn layer_norm(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    if has_kernels(x) {
        layer_norm_cpu(x, gamma, beta, eps)
    } else {
        layer_norm_ops(x, gamma, beta, eps)
    }
}

/// [`layer_norm`] from device-generic tensor ops (CUDA).
fn layer_norm_ops(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let xd = x.detach();
    let centred = xd.broadcast_sub(&xd.mean_keepdim(D::Minus1)?)?;
    let rstd = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let x_hat = centred.broadcast_mul(&rstd)?;
    let y = x_hat
        .broadcast_mul(&gamma.detach())?
        .broadcast_add(&beta.detach())?;
    x.apply_op3(
        gamma,
        beta,
        LayerNorm {
            y: fresh(y)?,
            x_hat,
            rstd,
        },
    )
}

/// [`layer_norm`] on the CPU: one pass over the rows each way.
fn layer_norm_cpu(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let x = rows_of(x, gamma, "layer_norm")?;
    let d = gamma.dims1()?;
    let (y, x_hat, rstd) = with_slices(&[&x.detach(), &gamma.detach(), &beta.detach()], |s| {
        let (xs, gamma, beta) = (s[0], s[1], s[2]);
        let mut y = vec![0f32; xs.len()];
        let mut x_hat = vec![0f32; xs.len()];
        let mut rstd = vec![0f32; xs.len() / d.max(1)];
        let rows = xs
            .chunks_exact(d)
            .zip(y.chunks_exact_mut(d))
            .zip(x_hat.chunks_exact_mut(d))
            .zip(rstd.iter_mut());
        for (((x, y), h), r) in rows {
            let mean = x.iter().sum::<f32>() / d as f32;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            *r = 1.0 / (var + eps as f32).sqrt();
            for j in 0..d {
                h[j] = (x[j] - mean) * *r;
                y[j] = h[j] * gamma[j] + beta[j];
            }
        }
        Ok((y, x_hat, rstd))
    })?;
    let op = LayerNormCpu {
        y: Handover::new(y, x.shape()),
        x_hat,
        rstd,
    };
    x.apply_op3(gamma, beta, op)
}

/// The CPU layer norm's op; the backward follows [`layer_norm`]'s formulas
/// row by row.
struct LayerNormCpu {
    y: Handover,
    /// Normalised input, `(.., D)`.
    x_hat: Vec<f32>,
    /// `1 / sqrt(var + eps)` per row.
    rstd: Vec<f32>,
}

impl CustomOp3 for LayerNormCpu {
    fn name(&self) -> &'static str {
        "layer-norm-cpu"
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
        self.y.take()
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = gamma.dims1()?;
        let grad = grad.detach().contiguous()?;
        let (dx, dgamma, dbeta) = with_slices(&[&grad, &gamma.detach()], |s| {
            let (grad, gamma) = (s[0], s[1]);
            let mut dx = vec![0f32; grad.len()];
            let (mut dgamma, mut dbeta) = (vec![0f32; d], vec![0f32; d]);
            let mut g_hat = vec![0f32; d];
            let rows = grad
                .chunks_exact(d)
                .zip(self.x_hat.chunks_exact(d))
                .zip(dx.chunks_exact_mut(d))
                .zip(&self.rstd);
            for (((g, h), dx), &r) in rows {
                let (mut mean_g, mut mean_gx) = (0f32, 0f32);
                for j in 0..d {
                    g_hat[j] = g[j] * gamma[j];
                    mean_g += g_hat[j];
                    mean_gx += g_hat[j] * h[j];
                    dgamma[j] += g[j] * h[j];
                    dbeta[j] += g[j];
                }
                let (mean_g, mean_gx) = (mean_g / d as f32, mean_gx / d as f32);
                for j in 0..d {
                    dx[j] = r * (g_hat[j] - mean_g - h[j] * mean_gx);
                }
            }
            Ok((dx, dgamma, dbeta))
        })?;
        let device = x.device();
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), device)?),
            Some(Tensor::from_vec(dgamma, d, device)?),
            Some(Tensor::from_vec(dbeta, d, device)?),
        ))
    }
}

struct LayerNorm {
    y: Tensor,
    /// Normalised input, `(.., D)`.
    x_hat: Tensor,
    /// `1 / sqrt(var + eps)`, `(.., 1)`.
    rstd: Tensor,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm"
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
        cpu_result(&self.y)
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
        cuda_result(&self.y)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach();
        let dgamma = sum_rows(&(&grad * &self.x_hat)?)?;
        let dbeta = sum_rows(&grad)?;

        let g_hat = grad.broadcast_mul(&gamma.detach())?;
        let mean_g = g_hat.mean_keepdim(D::Minus1)?;
        let mean_gx = (&g_hat * &self.x_hat)?.mean_keepdim(D::Minus1)?;
        let dx = g_hat
            .broadcast_sub(&mean_g)?
            .sub(&self.x_hat.broadcast_mul(&mean_gx)?)?
            .broadcast_mul(&self.rstd)?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// Softmax over the last dimension with a hand-written backward,
/// `dx = y * (g - sum(g * y))`: three passes over the (large) attention
/// scores instead of the eight or so of candle's composed softmax. The
/// forward uses candle's fused kernel, which has no backward of its own
/// (research/baselines.md, finding 6).
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let y = fresh(candle_nn::ops::softmax_last_dim(&x.detach().contiguous()?)?)?;
    x.apply_op1(Softmax { y })
}

struct Softmax {
    y: Tensor,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-last-dim"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_result(&self.y)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        cuda_result(&self.y)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let gy = (grad.detach() * &self.y)?;
        let dot = gy.sum_keepdim(D::Minus1)?;
        Ok(Some(gy.sub(&self.y.broadcast_mul(&dot)?)?))
    }
}

struct AddBias(Finished);

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-bias"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.cpu()
    }

    fn cuda_fwd(
        &self,
        _: &CudaStorage,
        _: &Layout,
        _: &CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        self.0.cuda()
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach();
        let db = sum_rows(&grad)?;
        Ok((Some(grad), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use rotsweep_shared::rng::SplitMix64;

    fn random_var(shape: &[usize], rng: &mut SplitMix64) -> candle_core::Result<Var> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect();
        Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    /// Values, then each var's gradient of `sum(y * probe)`, flattened.
    fn values_and_grads(
        y: &Tensor,
        probe: &Tensor,
        vars: &[&Var],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let grads = (y * probe)?.sum_all()?.backward()?;
        let mut out = vec![y.flatten_all()?.to_vec1::<f32>()?];
        for var in vars {
            let grad = grads
                .get(var.as_tensor())
                .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))?;
            out.push(grad.flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    fn assert_all_close(a: &[Vec<f32>], b: &[Vec<f32>]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.len(), y.len());
            for (u, v) in x.iter().zip(y) {
                assert!((u - v).abs() < 1e-5, "{u} vs {v}");
            }
        }
    }

    #[test]
    fn fused_bias_matches_the_broadcast_composition() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(3);
        let x = random_var(&[2, 5, 4], &mut rng)?;
        let b = random_var(&[4], &mut rng)?;
        let probe = random_var(&[2, 5, 4], &mut rng)?;
        let (xt, bt) = (x.as_tensor(), b.as_tensor());
        assert_all_close(
            &values_and_grads(&add_bias(xt, bt)?, probe.as_tensor(), &[&x, &b])?,
            &values_and_grads(&xt.broadcast_add(bt)?, probe.as_tensor(), &[&x, &b])?,
        );
        Ok(())
    }

    #[test]
    fn fused_bias_elu_matches_the_composition() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(8);
        // Both signs of x + b, and a row width with no whole SIMD chunk.
        let x = random_var(&[3, 4, 11], &mut rng)?;
        let b = random_var(&[11], &mut rng)?;
        let probe = random_var(&[3, 4, 11], &mut rng)?;
        let (xt, bt) = (x.as_tensor(), b.as_tensor());
        assert_all_close(
            &values_and_grads(&bias_elu(xt, bt)?, probe.as_tensor(), &[&x, &b])?,
            &values_and_grads(
                &xt.broadcast_add(bt)?.elu(1.0)?,
                probe.as_tensor(),
                &[&x, &b],
            )?,
        );
        let wrong = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
        let err = bias_elu(xt, &wrong).unwrap_err().to_string();
        assert!(err.contains("vector of 4"), "{err}");
        Ok(())
    }

    #[test]
    fn fused_layer_norm_matches_the_composition() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(6);
        let x = random_var(&[2, 5, 8], &mut rng)?;
        let gamma = random_var(&[8], &mut rng)?;
        let beta = random_var(&[8], &mut rng)?;
        let probe = random_var(&[2, 5, 8], &mut rng)?;
        let (xt, gt, bt) = (x.as_tensor(), gamma.as_tensor(), beta.as_tensor());

        let fused = layer_norm(xt, gt, bt, 1e-3)?;
        let ops = layer_norm_ops(xt, gt, bt, 1e-3)?;
        let centred = xt.broadcast_sub(&xt.mean_keepdim(D::Minus1)?)?;
        let std = (centred.sqr()?.mean_keepdim(D::Minus1)? + 1e-3)?.sqrt()?;
        let plain = centred
            .broadcast_div(&std)?
            .broadcast_mul(gt)?
            .broadcast_add(bt)?;
        let vars = [&x, &gamma, &beta];
        assert_all_close(
            &values_and_grads(&fused, probe.as_tensor(), &vars)?,
            &values_and_grads(&plain, probe.as_tensor(), &vars)?,
        );
        assert_all_close(
            &values_and_grads(&ops, probe.as_tensor(), &vars)?,
            &values_and_grads(&plain, probe.as_tensor(), &vars)?,
        );
        Ok(())
    }

    #[test]
    fn fused_softmax_matches_the_composed_softmax() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(5);
        let x = random_var(&[2, 3, 5, 7], &mut rng)?;
        let probe = random_var(&[2, 3, 5, 7], &mut rng)?;
        let fused = softmax_last_dim(x.as_tensor())?;
        let plain = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?;
        assert_all_close(
            &values_and_grads(&fused, probe.as_tensor(), &[&x])?,
            &values_and_grads(&plain, probe.as_tensor(), &[&x])?,
        );
        Ok(())
    }

    #[test]
    fn pooling_kernel_and_matrix_match_windowed_means() -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(4);
        // 7 steps, pool 3: windows [0..3] and [3..6]; step 6 is dropped.
        for dim in [0, 1] {
            let shape = if dim == 0 { [7, 2, 3] } else { [2, 7, 3] };
            let x = random_var(&shape, &mut rng)?;
            let xt = x.as_tensor();
            let plain = if dim == 0 {
                xt.narrow(0, 0, 6)?.reshape((2, 3, 2, 3))?.mean(1)?
            } else {
                xt.narrow(1, 0, 6)?.reshape((2, 2, 3, 3))?.mean(2)?
            };
            let probe = random_var(&[2, 2, 3], &mut rng)?;
            let want = values_and_grads(&plain, probe.as_tensor(), &[&x])?;
            let kernel = avg_pool(xt, dim, 3)?;
            assert_eq!(kernel.dims(), plain.dims());
            assert_all_close(&values_and_grads(&kernel, probe.as_tensor(), &[&x])?, &want);
            let matrix = avg_pool_matmul(xt, dim, 3, xt.dims3()?)?;
            assert_all_close(&values_and_grads(&matrix, probe.as_tensor(), &[&x])?, &want);
        }
        Ok(())
    }
}
