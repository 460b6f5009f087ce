//! Scaled dot-product attention of every head as one op.
//!
//! Composed from candle ops, attention materialises the `(B, h, T, T)`
//! scores and their softmax, keeps both for the backward pass, and needs
//! a transposed copy of every head's queries, keys and values (research
//! notes: at L = 1024 these tensors are 67 MB each and dominate mha's
//! step). The CPU path here works one query row at a time instead, the way
//! flash attention does on a GPU: the row of scores lives in a buffer of
//! `T` floats, the forward pass keeps only each row's log-sum-exp, and the
//! backward pass recomputes the probabilities from it. Nothing larger than
//! `(T, h*d)` is allocated, and queries, keys and values are read in place
//! in the `(B, T, h*d)` layout the projections produce.
//!
//! On other devices [`attention`] falls back to the composition, which
//! [`attention_composed`] keeps as the reference for the tests.
//!
//! With `P = softmax(Q K^T)` per head and row, `O = P V`, the backward is
//!
//! ```text
//! D_i  = dO_i . O_i
//! dS   = P * (dO V^T - D)          (D broadcast along each row)
//! dQ   = dS K,   dK = dS^T Q,   dV = P^T dO
//! ```

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::{matmul, simd, simd_dispatch, with_slices, Handover, Mat, MatMut};
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

/// Attention of `heads` heads: `q`, `k`, `v` are `(B, T, heads * d)`, head
/// `h` in columns `h*d .. (h+1)*d`; `q` is already scaled. Returns `(B, T,
/// heads * d)`, softmax(q k^T) v per head, in the same column layout.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    kernel: AttentionKernel,
) -> candle_core::Result<Tensor> {
    if kernel == AttentionKernel::Fused && q.device().is_cpu() && q.dtype() == DType::F32 {
        attention_cpu(q, k, v, heads)
    } else {
        attention_composed(q, k, v, heads)
    }
}

/// The same attention from plain candle ops (matmul, the fused softmax,
/// matmul); any device.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
) -> candle_core::Result<Tensor> {
    let dims = Dims::of(q, heads)?;
    let split = |x: &Tensor| -> candle_core::Result<Tensor> {
        x.reshape((dims.b, dims.t, heads, dims.d))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let scores = q.matmul(&k.t()?.contiguous()?)?;
    softmax_last_dim(&scores)?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((dims.b, dims.t, dims.w()))
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    t: usize,
    heads: usize,
    d: usize,
}

impl Dims {
    fn of(q: &Tensor, heads: usize) -> candle_core::Result<Dims> {
        let (b, t, w) = q.dims3()?;
        if heads == 0 || w % heads != 0 {
            candle_core::bail!("attention: width {w} is not a multiple of {heads} heads")
        }
        Ok(Dims {
            b,
            t,
            heads,
            d: w / heads,
        })
    }

    /// Row width, `heads * d`.
    fn w(&self) -> usize {
        self.heads * self.d
    }
}

fn attention_cpu(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let dims = Dims::of(q, heads)?;
    for (name, x) in [("keys", k), ("values", v)] {
        if x.dims() != q.dims() {
            candle_core::bail!(
                "attention: {name} are {:?}, queries {:?}",
                x.dims(),
                q.dims()
            )
        }
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mut out = vec![0f32; dims.b * dims.t * dims.w()];
    let mut lse = vec![0f32; dims.b * dims.heads * dims.t];
    with_slices(&[&q.detach(), &k.detach(), &v.detach()], |s| {
        forward(s[0], s[1], s[2], &mut out, &mut lse, dims);
        Ok(())
    })?;
    let out = Handover::new(out, q.shape());
    q.apply_op3(&k, &v, Attention { out, lse, dims })
}

struct Attention {
    /// The finished output, `(B, T, h*d)`.
    out: Handover,
    /// Log-sum-exp of each row of scores, `(B, h, T)`.
    lse: Vec<f32>,
    dims: Dims,
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "attention"
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
        self.out.take()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = q.elem_count();
        let (mut dq, mut dk, mut dv) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let grad = grad.detach().contiguous()?;
        with_slices(
            &[&q.detach(), &k.detach(), &v.detach(), &out.detach(), &grad],
            |s| {
                let grads = Grads {
                    dq: &mut dq,
                    dk: &mut dk,
                    dv: &mut dv,
                };
                backward(s[0], s[1], s[2], s[3], s[4], &self.lse, grads, self.dims);
                Ok(())
            },
        )?;
        let wrap = |x: Vec<f32>| Tensor::from_vec(x, q.shape(), q.device());
        Ok((Some(wrap(dq)?), Some(wrap(dk)?), Some(wrap(dv)?)))
    }
}

struct Grads<'a> {
    dq: &'a mut [f32],
    dk: &'a mut [f32],
    dv: &'a mut [f32],
}

/// Forward over the batch, one rayon task per sequence.
fn forward(q: &[f32], k: &[f32], v: &[f32], out: &mut [f32], lse: &mut [f32], dims: Dims) {
    let seq = dims.t * dims.w();
    out.par_chunks_mut(seq)
        .zip(lse.par_chunks_mut(dims.heads * dims.t))
        .enumerate()
        .for_each(|(b, (out, lse))| {
            let at = b * seq..(b + 1) * seq;
            let seq = Seq {
                q: &q[at.clone()],
                k: &k[at.clone()],
                v: &v[at],
                out: &[],
                dout: &[],
            };
            simd_dispatch!(forward_seq, forward_seq_avx2(&seq, out, lse, dims))
        });
}

/// Backward over the batch, one rayon task per sequence.
#[allow(clippy::too_many_arguments)]
fn backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    dout: &[f32],
    lse: &[f32],
    grads: Grads<'_>,
    dims: Dims,
) {
    let seq = dims.t * dims.w();
    grads
        .dq
        .par_chunks_mut(seq)
        .zip(grads.dk.par_chunks_mut(seq))
        .zip(grads.dv.par_chunks_mut(seq))
        .enumerate()
        .for_each(|(b, ((dq, dk), dv))| {
            let at = b * seq..(b + 1) * seq;
            let seq = Seq {
                q: &q[at.clone()],
                k: &k[at.clone()],
                v: &v[at.clone()],
                out: &out[at.clone()],
                dout: &dout[at],
            };
            let lse = &lse[b * dims.heads * dims.t..(b + 1) * dims.heads * dims.t];
            simd_dispatch!(
                backward_seq,
                backward_seq_avx2(&seq, lse, Grads { dq, dk, dv }, dims)
            )
        });
}

/// One sequence's inputs, each `(T, h*d)`; the backward pass also reads
/// the output and its gradient.
struct Seq<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    dout: &'a [f32],
}

/// One sequence's attention, every head.
#[inline(always)]
fn forward_seq(seq: &Seq<'_>, out: &mut [f32], lse: &mut [f32], dims: Dims) {
    let (t, d, w) = (dims.t, dims.d, dims.w());
    let mut p = vec![0f32; t * t];
    for h in 0..dims.heads {
        let (qh, kh, vh) = (&seq.q[h * d..], &seq.k[h * d..], &seq.v[h * d..]);
        // S = Q K^T, then each row's softmax in place.
        matmul(
            MatMut::new(&mut p, t, t, t, 1),
            Mat::new(qh, t, d, w, 1),
            Mat::new(kh, d, t, 1, w),
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
            Mat::new(vh, t, d, w, 1),
        );
    }
}

/// One sequence's gradients, every head.
#[inline(always)]
fn backward_seq(seq: &Seq<'_>, lse: &[f32], grads: Grads<'_>, dims: Dims) {
    let (t, d, w) = (dims.t, dims.d, dims.w());
    let mut p = vec![0f32; t * t];
    let mut ds = vec![0f32; t * t];
    let mut dot = vec![0f32; t];
    for h in 0..dims.heads {
        let cols = h * d..(h + 1) * d;
        let (qh, kh, vh) = (&seq.q[h * d..], &seq.k[h * d..], &seq.v[h * d..]);
        let doh = &seq.dout[h * d..];
        // P again, from the stored log-sum-exp.
        matmul(
            MatMut::new(&mut p, t, t, t, 1),
            Mat::new(qh, t, d, w, 1),
            Mat::new(kh, d, t, 1, w),
        );
        for (row, &lse) in p.chunks_exact_mut(t).zip(&lse[h * t..(h + 1) * t]) {
            simd::exp_shifted(row, lse);
        }
        // dS = P * (dO V^T - D), D_i = dO_i . O_i.
        matmul(
            MatMut::new(&mut ds, t, t, t, 1),
            Mat::new(doh, t, d, w, 1),
            Mat::new(vh, d, t, 1, w),
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
        // dQ = dS K, dK = dS^T Q, dV = P^T dO.
        matmul(
            MatMut::new(&mut grads.dq[h * d..], t, d, w, 1),
            Mat::new(&ds, t, t, t, 1),
            Mat::new(kh, t, d, w, 1),
        );
        matmul(
            MatMut::new(&mut grads.dk[h * d..], t, d, w, 1),
            Mat::new(&ds, t, t, 1, t),
            Mat::new(qh, t, d, w, 1),
        );
        matmul(
            MatMut::new(&mut grads.dv[h * d..], t, d, w, 1),
            Mat::new(&p, t, t, 1, t),
            Mat::new(doh, t, d, w, 1),
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn forward_seq_avx2(seq: &Seq<'_>, out: &mut [f32], lse: &mut [f32], dims: Dims) {
    forward_seq(seq, out, lse, dims)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn backward_seq_avx2(seq: &Seq<'_>, lse: &[f32], grads: Grads<'_>, dims: Dims) {
    backward_seq(seq, lse, grads, dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
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
        let shape = [b, t, heads * d];
        let (q, k, v) = (
            random_var(&shape, &mut rng)?,
            random_var(&shape, &mut rng)?,
            random_var(&shape, &mut rng)?,
        );
        let probe = random_var(&shape, &mut rng)?;
        let run = |f: fn(&Tensor, &Tensor, &Tensor, usize) -> candle_core::Result<Tensor>| {
            let y = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), heads)?;
            let grads = (&y * probe.as_tensor())?.sum_all()?.backward()?;
            let mut out = vec![y.flatten_all()?.to_vec1::<f32>()?];
            for var in [&q, &k, &v] {
                let g = grads
                    .get(var.as_tensor())
                    .expect("a gradient for every input");
                out.push(g.flatten_all()?.to_vec1::<f32>()?);
            }
            candle_core::Result::Ok(out)
        };
        let fused = run(attention_cpu)?;
        let plain = run(attention_composed)?;
        for (what, (x, y)) in ["out", "dq", "dk", "dv"]
            .iter()
            .zip(fused.iter().zip(&plain))
        {
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
    fn attention_rejects_mismatched_inputs() -> candle_core::Result<()> {
        let q = Tensor::zeros((2, 5, 8), DType::F32, &Device::Cpu)?;
        let k = Tensor::zeros((2, 4, 8), DType::F32, &Device::Cpu)?;
        let err = attention(&q, &k, &q, 2, AttentionKernel::Fused)
            .unwrap_err()
            .to_string();
        assert!(err.contains("keys"), "{err}");
        let err = attention(&q, &q, &q, 3, AttentionKernel::Fused)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 heads"), "{err}");
        Ok(())
    }
}
