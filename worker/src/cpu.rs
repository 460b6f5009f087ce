//! Building blocks of the worker's CPU kernels ([`crate::attention`], [`crate::ops`],
//! [`crate::recurrent`]): strided matrix views over slices, a matmul on
//! them with the `gemm` crate (the GEMM candle's CPU backend uses), and
//! vector helpers written so that LLVM vectorises them, compiled a second
//! time for AVX2 + FMA and chosen at run time ([`simd_dispatch`]).

use std::sync::{Mutex, PoisonError};

use candle_core::{CpuStorage, DType, Shape, Storage, Tensor};

/// `simd_dispatch!(plain, fast(args..))` calls `fast`, the copy of
/// `plain` compiled for AVX2 + FMA, when the CPU has them, else `plain`.
/// The release build targets baseline x86-64 (SSE2); the kernels and
/// everything they call are `#[inline(always)]`, so the copy's whole body
/// is compiled with the wider vectors.
macro_rules! simd_dispatch {
    ($plain:ident, $fast:ident($($arg:expr),*)) => {{
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features the copy enables.
                unsafe { $fast($($arg),*) }
            } else {
                $plain($($arg),*)
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            $plain($($arg),*)
        }
    }};
}
pub(crate) use simd_dispatch;

/// True when the CPU kernels apply to `t`: an f32 tensor on the CPU. Every
/// op with a kernel asks this one question and otherwise falls back to its
/// tensor-op version.
pub fn has_kernels(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// Runs `f` on the f32 contents of contiguous CPU tensors.
pub fn with_slices<R>(
    ts: &[&Tensor],
    f: impl FnOnce(&[&[f32]]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards: Vec<_> = ts.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(ts.len());
    for (storage, layout) in &guards {
        let Storage::Cpu(s) = &**storage else {
            candle_core::bail!("CPU kernel: tensor is not on the CPU")
        };
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("CPU kernel: tensor is not contiguous".into())
        })?;
        slices.push(&s.as_slice::<f32>()?[start..end]);
    }
    f(&slices)
}

/// A custom op's CPU result, computed before the op is applied and handed
/// to candle by its forward without a copy. The backward reads it back as
/// the op's result tensor.
pub struct Handover(Mutex<Option<(Vec<f32>, Shape)>>);

impl Handover {
    pub fn new(data: Vec<f32>, shape: impl Into<Shape>) -> Self {
        Self(Mutex::new(Some((data, shape.into()))))
    }

    /// The result, once; an error if the forward runs a second time.
    pub fn take(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, shape) = self
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| candle_core::Error::Msg("fused op: forward ran twice".into()))?;
        Ok((CpuStorage::F32(data), shape))
    }
}

/// A strided matrix in a slice: element `(r, c)` is `data[r * rs + c * cs]`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// Panics unless every element lies inside `data`.
    pub fn new(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            fits(data.len(), rows, cols, rs, cs),
            "matrix outside its slice"
        );
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }
}

/// A strided matrix to write, as [`Mat`].
pub struct MatMut<'a> {
    data: &'a mut [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatMut<'a> {
    /// Panics unless every element lies inside `data`.
    pub fn new(data: &'a mut [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        assert!(
            fits(data.len(), rows, cols, rs, cs),
            "matrix outside its slice"
        );
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }
}

fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    rows == 0 || cols == 0 || (rows - 1) * rs + (cols - 1) * cs < len
}

/// `dst = lhs rhs` on this thread, with the `gemm` crate.
pub fn matmul(dst: MatMut<'_>, lhs: Mat<'_>, rhs: Mat<'_>) {
    gemm_into(dst, lhs, rhs, Gemm::default());
}

/// How [`gemm_into`] writes and whether it uses threads.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    /// `dst += lhs rhs` instead of `dst = lhs rhs`.
    pub accumulate: bool,
    /// Split the work over rayon's pool (for one large product; kernels
    /// that already run one task per sequence leave it off).
    pub parallel: bool,
    /// Multiplies the product.
    pub scale: f32,
}

impl Default for Gemm {
    fn default() -> Self {
        Self {
            accumulate: false,
            parallel: false,
            scale: 1.0,
        }
    }
}

impl Gemm {
    /// `dst = scale * lhs rhs`, on this thread.
    pub fn scaled(scale: f32) -> Self {
        Self {
            scale,
            ..Self::default()
        }
    }
}

/// `dst (+)= scale * lhs rhs` with the `gemm` crate, the GEMM candle's CPU
/// backend uses.
pub fn gemm_into(dst: MatMut<'_>, lhs: Mat<'_>, rhs: Mat<'_>, how: Gemm) {
    assert!(
        lhs.rows == dst.rows && rhs.cols == dst.cols && lhs.cols == rhs.rows,
        "matmul of {}x{} by {}x{} into {}x{}",
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols,
        dst.rows,
        dst.cols
    );
    let parallelism = if how.parallel && rayon::current_num_threads() > 1 {
        gemm::Parallelism::Rayon(rayon::current_num_threads())
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `Mat::new` and `MatMut::new` checked that every element of
    // the three matrices lies inside its slice, the shapes agree (above),
    // and `dst` is borrowed mutably, so it overlaps neither input.
    unsafe {
        gemm::gemm(
            dst.rows,
            dst.cols,
            lhs.cols,
            dst.data.as_mut_ptr(),
            dst.cs as isize,
            dst.rs as isize,
            how.accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            how.scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Vector helpers written so that LLVM vectorises them: fixed-width lane
/// arrays for reductions, no branches or library calls in loops.
pub mod simd {
    /// Lanes of the manual reductions: enough for one AVX register.
    const LANES: usize = 8;

    /// Largest element (NaN if any is NaN).
    #[inline(always)]
    pub fn max(xs: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; LANES];
        let mut nan = false;
        let chunks = xs.chunks_exact(LANES);
        let rest = chunks.remainder();
        for chunk in chunks {
            for (m, &x) in lanes.iter_mut().zip(chunk) {
                nan |= x.is_nan();
                *m = if x > *m { x } else { *m };
            }
        }
        for &x in rest {
            nan |= x.is_nan();
            lanes[0] = if x > lanes[0] { x } else { lanes[0] };
        }
        if nan {
            return f32::NAN;
        }
        lanes.into_iter().fold(f32::NEG_INFINITY, f32::max)
    }

    /// `x <- exp(x - shift)` for every element; returns their sum.
    #[inline(always)]
    pub fn exp_shifted(xs: &mut [f32], shift: f32) -> f32 {
        for x in xs.iter_mut() {
            *x = exp(*x - shift);
        }
        sum(xs)
    }

    /// The logistic function `1 / (1 + e^-x)`, to about 1e-7.
    #[inline(always)]
    pub fn sigmoid(x: f32) -> f32 {
        1.0 / (1.0 + exp(-x))
    }

    /// `tanh x` to about 1e-7 absolute, from one [`exp`] of `-2|x|`.
    #[inline(always)]
    pub fn tanh(x: f32) -> f32 {
        let e = exp(-2.0 * x.abs());
        ((1.0 - e) / (1.0 + e)).copysign(x)
    }

    /// `x <- a * x` for every element.
    #[inline(always)]
    pub fn scale(xs: &mut [f32], a: f32) {
        for x in xs.iter_mut() {
            *x *= a;
        }
    }

    /// Sum of the elements, in `LANES` partial sums.
    #[inline(always)]
    pub fn sum(xs: &[f32]) -> f32 {
        let mut lanes = [0f32; LANES];
        let chunks = xs.chunks_exact(LANES);
        let rest: f32 = chunks.remainder().iter().sum();
        for chunk in chunks {
            for (acc, &x) in lanes.iter_mut().zip(chunk) {
                *acc += x;
            }
        }
        rest + lanes.iter().sum::<f32>()
    }

    /// `e^x` to within a few ulp for `x` in [-87, 88], branch-free so that
    /// loops over it vectorise: `e^x = 2^n * e^g` with `n = round(x / ln
    /// 2)`, `|g| <= ln 2 / 2`, and `e^g` by its Taylor series to the 7th
    /// power (remainder below 1e-8). Below -87 it returns `e^-87` (about
    /// 1.6e-38, zero for a softmax); NaN stays NaN.
    #[inline(always)]
    pub fn exp(x: f32) -> f32 {
        const LN2_HI: f32 = 0.693_145_75;
        const LN2_LO: f32 = 1.428_606_8e-6;
        // Adding 1.5 * 2^23 rounds to an integer, which lands in the low
        // mantissa bits: no libm call, no float-to-int conversion.
        const ROUND: f32 = 12_582_912.0;
        let c = x.clamp(-87.0, 88.0);
        let shifted = c * std::f32::consts::LOG2_E + ROUND;
        let n = shifted - ROUND;
        let g = (c - n * LN2_HI) - n * LN2_LO;
        let p = 1.0
            + g * (1.0
                + g * (0.5
                    + g * (1.0 / 6.0
                        + g * (1.0 / 24.0
                            + g * (1.0 / 120.0 + g * (1.0 / 720.0 + g * (1.0 / 5040.0)))))));
        let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits());
        let scale = f32::from_bits(n_bits.wrapping_add(127) << 23);
        if x.is_nan() {
            x
        } else {
            p * scale
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn exp_is_within_a_few_ulp_of_std() {
            let mut worst = 0f32;
            let mut x = -87.0f32;
            while x <= 88.0 {
                let (got, want) = (super::exp(x), x.exp());
                worst = worst.max((got - want).abs() / want);
                x += 0.0137;
            }
            assert!(worst < 3e-7, "worst relative error {worst}");
            assert_eq!(super::exp(-1000.0), (-87.0f32).exp());
            assert_eq!(super::exp(f32::NEG_INFINITY), (-87.0f32).exp());
            assert!(super::exp(f32::NAN).is_nan());
            assert_eq!(super::exp(0.0), 1.0);
        }

        #[test]
        fn max_sees_every_element_and_nan() {
            let xs: Vec<f32> = (0..19).map(|i| ((i * 7) % 19) as f32 - 3.0).collect();
            assert_eq!(super::max(&xs), 15.0);
            let mut with_nan = xs.clone();
            with_nan[17] = f32::NAN;
            assert!(super::max(&with_nan).is_nan());
        }
    }
}
