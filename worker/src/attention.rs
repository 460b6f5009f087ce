//! Scaled dot-product attention of every head as one op.
//!
//! Composed from candle ops, attention materialises the `(B, h, T, T)`
//! scores and their softmax, keeps both for the backward pass, and needs
//! a transposed copy of every head's queries, keys and values (research
//! notes: at L = 1024 these tensors are 67 MB each and dominate mha's
//! step). The CPU path here works one sequence and head at a time instead,
//! one rayon task per sequence: the head's `(T, T)` scores are one GEMM
//! into a buffer of the task's, the softmax runs on each row in place, the
//! forward pass keeps only each row's log-sum-exp, and the backward pass
//! recomputes the probabilities from it (as flash attention does on a
//! GPU). Nothing larger than `(T, T)` per task is allocated, and queries,
//! keys and values are read in place in the `(B, T, 3 h*d)` layout of their
//! one packed projection (its gradient comes back in the same layout, so
//! the three projections are one matmul each way).
//!
//! On other devices [`attention`] falls back to the composition, which
//! [`attention_composed`] keeps as the reference for the tests.
//!
//! With `P = softmax(c Q K^T)` per head and row (`c` the scale), `O = P
//! V`, the backward is
//!
//! ```text
//! D_i  = dO_i . O_i
//! dS   = P * (dO V^T - D)          (D broadcast along each row)
//! dQ   = c dS K,   dK = c dS^T Q,   dV = P^T dO
//! ```

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{
    gemm_into, has_kernels, matmul, simd, simd_dispatch, with_slices, Gemm, Handover, Mat, MatMut,
};
use crate::ops::softmax_last_dim;

/// Which implementation attention uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// The fused op on the CPU, the composition elsewhere (the default).
    #[default]
    Fused,
    /// Plain candle ops everywhere; slower, kept as the reference.
    Composed,
}

/// Attention of `heads` heads from packed projections: `qkv` is `(B, T, 3
/// W)` with the queries in columns `0..W`, the keys in `W..2W` and the
/// values in `2W..3W`, head `h` in columns `h*d .. (h+1)*d` of each (`W =
/// heads * d`). Returns `(B, T, W)`: softmax(scale q k^T) v per head, in
/// the same column layout.
pub fn attention(
    qkv: &Tensor,
    heads: usize,
    scale: f64,
    kernel: AttentionKernel,
) -> candle_core::Result<Tensor> {
    if kernel == AttentionKernel::Fused && has_kernels(qkv) {
        attention_cpu(qkv, heads, scale)
    } else {
        attention_composed(qkv, heads, scale)
    }
}

/// The same attention from plain candle ops (narrow, matmul, the fused
/// softmax, matmul); any device.
pub fn attention_composed(qkv: &Tensor, heads: usize, scale: f64) -> candle_core::Result<Tensor> {
    let dims = Dims::of(qkv, heads)?;
    let w = dims.w();
    let split = |at: usize| -> candle_core::Result<Tensor> {
        qkv.narrow(2, at * w, w)?
            .reshape((dims.b, dims.t, heads, dims.d))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = ((split(0)? * scale)?, split(1)?, split(2)?);
    let scores = q.matmul(&k.t()?.contiguous()?)?;
    softmax_last_dim(&scores)?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((dims.b, dims.t, w))
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    heads: usize,
    d: usize,
    /// Multiplies the scores.
    scale: f32,
}

impl Dims {
    fn of(qkv: &Tensor, heads: usize) -> candle_core::Result<Dims> {
        let (b, t, w3) = qkv.dims3()?;
        if heads == 0 || w3 % (3 * heads) != 0 {
            candle_core::bail!(
                "attention: packed width {w3} is not 3 x a multiple of {heads} heads"
            )
        }
        Ok(Dims {
            b,
            t,
            heads,
            d: w3 / 3 / heads,
            scale: 1.0,
        })
    }

    /// Output row width, `heads * d`.
    fn w(&self) -> usize {
        self.heads * self.d
    }

    /// Packed input row width, `3 * heads * d`.
    fn w3(&self) -> usize {
        3 * self.w()
    }
}

fn attention_cpu(qkv: &Tensor, heads: usize, scale: f64) -> candle_core::Result<Tensor> {
    let dims = Dims {
        scale: scale as f32,
        ..Dims::of(qkv, heads)?
    };
    let qkv = qkv.contiguous()?;
    let mut out = vec![0f32; dims.b * dims.t * dims.w()];
    let mut lse = vec![0f32; dims.b * dims.heads * dims.t];
    with_slices(&[&qkv.detach()], |s| {
        forward(s[0], &mut out, &mut lse, dims);
        Ok(())
    })?;
    let out = Handover::new(out, (dims.b, dims.t, dims.w()));
    qkv.apply_op1(Attention { out, lse, dims })
}

struct Attention {
    /// The finished output, `(B, T, h*d)`.
    out: Handover,
    /// Log-sum-exp of each row of scores, `(B, h, T)`.
    lse: Vec<f32>,
    dims: Dims,
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "attention"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.out.take()
    }

    fn bwd(
        &self,
        qkv: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let mut dqkv = vec![0f32; qkv.elem_count()];
        let grad = grad.detach().contiguous()?;
        with_slices(&[&qkv.detach(), &out.detach(), &grad], |s| {
            backward(s[0], s[1], s[2], &self.lse, &mut dqkv, self.dims);
            Ok(())
        })?;
        Ok(Some(Tensor::from_vec(dqkv, qkv.shape(), qkv.device())?))
    }
}

/// Forward over the batch, one rayon task per sequence.
fn forward(qkv: &[f32], out: &mut [f32], lse: &mut [f32], dims: Dims) {
    let (seq_in, seq_out) = (dims.t * dims.w3(), dims.t * dims.w());
    out.par_chunks_mut(seq_out)
        .zip(lse.par_chunks_mut(dims.heads * dims.t))
        .zip(qkv.par_chunks(seq_in))
        .for_each(|((out, lse), qkv)| {
            simd_dispatch!(forward_seq, forward_seq_avx2(qkv, out, lse, dims))
        });
}

/// Backward over the batch, one rayon task per sequence.
fn backward(qkv: &[f32], out: &[f32], dout: &[f32], lse: &[f32], dqkv: &mut [f32], dims: Dims) {
    let (seq_in, seq_out) = (dims.t * dims.w3(), dims.t * dims.w());
    dqkv.par_chunks_mut(seq_in)
        .zip(qkv.par_chunks(seq_in))
        .zip(out.par_chunks(seq_out).zip(dout.par_chunks(seq_out)))
        .zip(lse.par_chunks(dims.heads * dims.t))
        .for_each(|(((dqkv, qkv), (out, dout)), lse)| {
            let seq = Seq { qkv, out, dout };
            simd_dispatch!(backward_seq, backward_seq_avx2(&seq, lse, dqkv, dims))
        });
}

/// One sequence for the backward pass: its packed `(T, 3 h*d)` input, and
/// its `(T, h*d)` output and output gradient.
struct Seq<'a> {
    qkv: &'a [f32],
    out: &'a [f32],
    dout: &'a [f32],
}

/// One sequence's attention, every head.
#[inline(always)]
fn forward_seq(qkv: &[f32], out: &mut [f32], lse: &mut [f32], dims: Dims) {
    let (t, d, w, w3) = (dims.t, dims.d, dims.w(), dims.w3());
    let mut p = vec![0f32; t * t];
    for h in 0..dims.heads {
        let (qh, kh, vh) = (&qkv[h * d..], &qkv[w + h * d..], &qkv[2 * w + h * d..]);
        // S = c Q K^T, then each row's softmax in place.
        gemm_into(
            MatMut::new(&mut p, t, t, t, 1),
            Mat::new(qh, t, d, w3, 1),
            Mat::new(kh, d, t, 1, w3),
            Gemm::scaled(dims.scale),
        );
        for (row, lse) in p.chunks_exact_mut(t).zip(&mut lse[h * t..(h + 1) * t]) {
            let m = simd::max(row);
            let l = simd::exp_shifted(row, m);
            *lse = m + l.ln();
            simd::scale(row, 1.0 / l);
        }
        // O = P V, written into this head's columns.
        matmul(
            MatMut::new(&mut out[h * d..], t, d, w, 1),
            Mat::new(&p, t, t, t, 1),
            Mat::new(vh, t, d, w3, 1),
        );
    }
}

/// One sequence's gradients, every head, into its packed `(T, 3 h*d)`
/// gradient.
#[inline(always)]
fn backward_seq(seq: &Seq<'_>, lse: &[f32], dqkv: &mut [f32], dims: Dims) {
    let (t, d, w, w3) = (dims.t, dims.d, dims.w(), dims.w3());
    let mut p = vec![0f32; t * t];
    let mut ds = vec![0f32; t * t];
    let mut dot = vec![0f32; t];
    for h in 0..dims.heads {
        let cols = h * d..(h + 1) * d;
        let qkv = seq.qkv;
        let (qh, kh, vh) = (&qkv[h * d..], &qkv[w + h * d..], &qkv[2 * w + h * d..]);
        let doh = &seq.dout[h * d..];
        // P again, from the stored log-sum-exp.
        gemm_into(
            MatMut::new(&mut p, t, t, t, 1),
            Mat::new(qh, t, d, w3, 1),
            Mat::new(kh, d, t, 1, w3),
            Gemm::scaled(dims.scale),
        );
        for (row, &lse) in p.chunks_exact_mut(t).zip(&lse[h * t..(h + 1) * t]) {
            simd::exp_shifted(row, lse);
        }
        // dS = P * (dO V^T - D), D_i = dO_i . O_i.
        matmul(
            MatMut::new(&mut ds, t, t, t, 1),
            Mat::new(doh, t, d, w, 1),
            Mat::new(vh, d, t, 1, w3),
        );
        for (i, di) in dot.iter_mut().enumerate() {
            let doi = &seq.dout[i * w..][cols.clone()];
            let oi = &seq.out[i * w..][cols.clone()];
            *di = doi.iter().zip(oi).map(|(a, b)| a * b).sum();
        }
        for ((g_row, p_row), &di) in ds.chunks_exact_mut(t).zip(p.chunks_exact(t)).zip(&dot) {
            for (g, &pj) in g_row.iter_mut().zip(p_row) {
                *g = pj * (*g - di);
            }
        }
        // dQ = c dS K, dK = c dS^T Q, dV = P^T dO.
        gemm_into(
            MatMut::new(&mut dqkv[h * d..], t, d, w3, 1),
            Mat::new(&ds, t, t, t, 1),
            Mat::new(kh, t, d, w3, 1),
            Gemm::scaled(dims.scale),
        );
        gemm_into(
            MatMut::new(&mut dqkv[w + h * d..], t, d, w3, 1),
            Mat::new(&ds, t, t, 1, t),
            Mat::new(qh, t, d, w3, 1),
            Gemm::scaled(dims.scale),
        );
        matmul(
            MatMut::new(&mut dqkv[2 * w + h * d..], t, d, w3, 1),
            Mat::new(&p, t, t, 1, t),
            Mat::new(doh, t, d, w, 1),
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_seq_avx2(qkv: &[f32], out: &mut [f32], lse: &mut [f32], dims: Dims) {
    forward_seq(qkv, out, lse, dims)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_seq_avx2(seq: &Seq<'_>, lse: &[f32], dqkv: &mut [f32], dims: Dims) {
    backward_seq(seq, lse, dqkv, dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use rotsweep_shared::rng::SplitMix64;

    fn random_var(shape: &[usize], rng: &mut SplitMix64) -> candle_core::Result<Var> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (rng.next_f64() * 4.0 - 2.0) as f32)
            .collect();
        Var::from_tensor(&Tensor::from_vec(values, shape, &Device::Cpu)?)
    }

    /// Values and gradients of `sum(attention * probe)` for both paths.
    fn compare(b: usize, t: usize, heads: usize, d: usize, seed: u64) -> candle_core::Result<()> {
        let mut rng = SplitMix64::new(seed);
        let qkv = random_var(&[b, t, 3 * heads * d], &mut rng)?;
        let probe = random_var(&[b, t, heads * d], &mut rng)?;
        let scale = 0.7;
        let run = |f: fn(&Tensor, usize, f64) -> candle_core::Result<Tensor>| {
            let y = f(qkv.as_tensor(), heads, scale)?;
            let grads = (&y * probe.as_tensor())?.sum_all()?.backward()?;
            let g = grads.get(qkv.as_tensor()).expect("a gradient");
            candle_core::Result::Ok(vec![
                y.flatten_all()?.to_vec1::<f32>()?,
                g.flatten_all()?.to_vec1::<f32>()?,
            ])
        };
        let fused = run(attention_cpu)?;
        let plain = run(attention_composed)?;
        for (what, (x, y)) in ["out", "dqkv"].iter().zip(fused.iter().zip(&plain)) {
            assert_eq!(x.len(), y.len());
            for (i, (u, w)) in x.iter().zip(y).enumerate() {
                let tol = 1e-5 * (1.0 + w.abs());
                assert!((u - w).abs() < tol, "{what}[{i}]: fused {u}, composed {w}");
            }
        }
        Ok(())
    }

    #[test]
    fn fused_attention_matches_the_composition_with_gradients() -> candle_core::Result<()> {
        // Odd sizes (no full SIMD chunk), and the default head size.
        compare(2, 7, 2, 3, 1)?;
        compare(3, 21, 4, 16, 2)?;
        compare(1, 1, 1, 5, 3)?;
        Ok(())
    }

    #[test]
    fn attention_rejects_a_width_that_is_not_three_heads_wide() -> candle_core::Result<()> {
        let qkv = Tensor::zeros((2, 5, 12), DType::F32, &Device::Cpu)?;
        let err = attention(&qkv, 3, 1.0, AttentionKernel::Fused)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 heads"), "{err}");
        assert!(attention(&qkv, 2, 1.0, AttentionKernel::Fused).is_ok());
        Ok(())
    }
}
