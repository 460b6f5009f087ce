//! The three sequence classifiers (SimpleRNN, GRU, multi-head attention) as
//! candle modules, plus the deterministic initialiser the trainer uses.
//!
//! Every model is
//!
//! ```text
//! tokens (B, L) -> Embedding(vocab, E) [-> x sqrt(E) + sinusoidal positions (mha)]
//!   -> Conv1D(F, kernel K, stride S, 'valid', ELU)        (B, T0, F)
//!   -> body
//!   -> [Dropout -> Dense(u, ELU)] for each hidden width   (B, u)
//!   -> Dense(n_classes) logits                            (B, n_classes)
//! ```
//!
//! Bodies (`p` = pooling width, `m` = `modules`):
//! - `rnn`: m x [SimpleRNN(units, return sequences) -> AvgPool1D(p)], then
//!   SimpleRNN(final_units) returning its last state.
//! - `gru`: the same with GRU cells (reset-after, see [`crate::recurrent`]).
//! - `mha`: m x [self-attention(heads, key_size) + residual -> layer norm ->
//!   AvgPool1D(p)], then one more attention block (attention + residual +
//!   layer norm, no pooling), then global max pooling over time. The extra
//!   block mirrors the final recurrent layer of the other bodies and gives
//!   the reference parameter count (50,414 with the defaults, 46 classes and
//!   vocabulary 27; research/baselines.md).
//!
//! Parameter counts follow Keras: SimpleRNN has one bias, GRU two
//! (`reset_after=True`). The softmax of the output is part of the loss.
//!
//! Traps avoided (research/baselines.md, finding 6): candle-nn's fused
//! `LayerNorm` and `softmax_last_dim` cut the autograd graph, so the layer
//! norm and the attention softmax here are ops with hand-written backward
//! passes ([`crate::ops::layer_norm`], [`crate::ops::softmax_last_dim`]),
//! tested against the plain differentiable compositions. On the CPU the
//! whole attention of a block is one op ([`crate::attention`]).

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, VarMap};
use rotsweep_shared::rng::{mix_seed, SplitMix64};
use rotsweep_shared::spec::{ModelKind, ModelSpec};

use crate::attention::{attention, AttentionKernel};
use crate::ops::{add_bias, avg_pool, bias_elu, layer_norm};
use crate::recurrent::{gru_sequence, rnn_sequence, Cell, Recurrence};
use crate::{Error, Result};

/// Keras' default layer-normalisation epsilon.
const LAYER_NORM_EPS: f64 = 1e-3;

/// One row of a Keras-like model summary; defined in the shared crate so
/// the coordinator can store and draw it without candle.
pub use rotsweep_shared::architecture::LayerInfo;

/// A recurrent layer: input projection plus one of the cells.
struct RecurrentLayer {
    cell: Cell,
    /// Input weight, `(G*H, In)`.
    w_ih: Tensor,
    /// Input bias (the only bias of a SimpleRNN), `(G*H)`.
    b_ih: Tensor,
    /// Recurrent weight, `(G*H, H)`.
    w_hh: Tensor,
    /// Recurrent bias, `(G*H)`; GRU only.
    b_hh: Option<Tensor>,
}

impl RecurrentLayer {
    fn new(cell: Cell, n_in: usize, units: usize, vb: VarBuilder) -> Result<Self> {
        // FIXME(#5): Keras initialises recurrent kernels orthogonally; these
        // use Glorot uniform. An `Init` for it would need a QR step in
        // `SeededInit`.
        let g = cell.gates() * units;
        let w_ih = vb.get_with_hints((g, n_in), "w_ih", glorot(n_in, g))?;
        let b_ih = vb.get_with_hints(g, "b_ih", Init::Const(0.0))?;
        let w_hh = vb.get_with_hints((g, units), "w_hh", glorot(units, g))?;
        let b_hh = match cell {
            Cell::Rnn => None,
            Cell::Gru => Some(vb.get_with_hints(g, "b_hh", Init::Const(0.0))?),
        };
        Ok(Self {
            cell,
            w_ih,
            b_ih,
            w_hh,
            b_hh,
        })
    }

    /// Parameters of a layer with these sizes.
    fn n_params(cell: Cell, n_in: usize, units: usize) -> usize {
        let g = cell.gates() * units;
        let biases = match cell {
            Cell::Rnn => g,
            Cell::Gru => 2 * g,
        };
        g * n_in + g * units + biases
    }

    /// `xs`: `(T, B, In)` -> all states `(T, B, H)`.
    fn forward(&self, xs: &Tensor, how: Recurrence) -> Result<Tensor> {
        let (n_steps, b, n_in) = xs.dims3()?;
        let g = self.w_ih.dim(0)?;
        let xp = xs.reshape((n_steps * b, n_in))?.matmul(&self.w_ih.t()?)?;
        let xp = add_bias(&xp, &self.b_ih)?.reshape((n_steps, b, g))?;
        let hs = match (&self.b_hh, self.cell) {
            (Some(b_hh), Cell::Gru) => gru_sequence(&xp, &self.w_hh, b_hh, how)?,
            _ => rnn_sequence(&xp, &self.w_hh, how)?,
        };
        Ok(hs)
    }
}

/// Self-attention + residual + layer norm.
struct AttentionBlock {
    heads: usize,
    key_size: usize,
    query: Dense,
    key: Dense,
    value: Dense,
    output: Dense,
    /// Layer-norm scale and shift, `(D)`.
    gamma: Tensor,
    beta: Tensor,
}

impl AttentionBlock {
    fn new(width: usize, heads: usize, key_size: usize, vb: VarBuilder) -> Result<Self> {
        let inner = heads * key_size;
        Ok(Self {
            heads,
            key_size,
            query: Dense::new(width, inner, vb.pp("query"))?,
            key: Dense::new(width, inner, vb.pp("key"))?,
            value: Dense::new(width, inner, vb.pp("value"))?,
            output: Dense::new(inner, width, vb.pp("output"))?,
            gamma: vb.get_with_hints(width, "norm.gamma", Init::Const(1.0))?,
            beta: vb.get_with_hints(width, "norm.beta", Init::Const(0.0))?,
        })
    }

    fn n_params_attention(width: usize, heads: usize, key_size: usize) -> usize {
        let inner = heads * key_size;
        3 * (width * inner + inner) + inner * width + width
    }

    /// `xs`: `(B, T, D)` -> `(B, T, D)`.
    fn forward(&self, xs: &Tensor, kernel: AttentionKernel) -> Result<Tensor> {
        // The three projections as one matmul, `(B, T, 3 h*d)`; the kernel
        // reads them in place and returns their gradient packed the same way.
        let (q, k, v) = (&self.query, &self.key, &self.value);
        let w = Tensor::cat(&[&q.w, &k.w, &v.w], 0)?;
        let b = Tensor::cat(&[&q.b, &k.b, &v.b], 0)?;
        let qkv = linear(xs, &w, &b)?;
        let scale = 1.0 / (self.key_size as f64).sqrt();
        // (B, T, h*d): every head's softmax(scale q k^T) v, side by side.
        let mixed = attention(&qkv, self.heads, scale, kernel)?;
        let ys = (xs + self.output.forward(&mixed)?)?;
        Ok(layer_norm(&ys, &self.gamma, &self.beta, LAYER_NORM_EPS)?)
    }

    fn weights(&self) -> [&Tensor; 4] {
        [&self.query.w, &self.key.w, &self.value.w, &self.output.w]
    }
}

enum Body {
    Recurrent {
        modules: Vec<RecurrentLayer>,
        last: RecurrentLayer,
    },
    Attention {
        modules: Vec<AttentionBlock>,
        last: AttentionBlock,
    },
}

/// A sequence classifier; see the module docs for the architecture.
pub struct Model {
    spec: ModelSpec,
    max_len: usize,
    n_classes: usize,
    /// Embedding table, `(vocab, E)`.
    embedding: Tensor,
    /// Sinusoidal positional encoding, `(max_len, E)`; mha only.
    positions: Option<Tensor>,
    /// Conv1D kernel `(F, E, K)` and bias `(F)`.
    conv_w: Tensor,
    conv_b: Tensor,
    body: Body,
    dense: Vec<Dense>,
    output: Dense,
    recurrence: Recurrence,
    attention: AttentionKernel,
    /// Stream for dropout masks; its state is part of a checkpoint.
    dropout_rng: Mutex<SplitMix64>,
    layers: Vec<LayerInfo>,
}

impl Model {
    /// Builds a model, taking (or creating) its variables from `vb`.
    ///
    /// - `vocab_size`: token ids, padding and OOV included.
    /// - `n_classes`: output width.
    /// - `max_len`: the sequence length the model will see.
    ///
    /// Errors with [`Error::SequenceTooShort`] when `max_len` leaves no time
    /// step after the convolution and the pooling layers.
    pub fn new(
        spec: &ModelSpec,
        vocab_size: usize,
        n_classes: usize,
        max_len: usize,
        vb: VarBuilder,
    ) -> Result<Model> {
        if vocab_size == 0 || n_classes == 0 {
            return Err(Error::InvalidModel(format!(
                "vocabulary size {vocab_size} and class count {n_classes} must be positive"
            )));
        }
        let steps = time_steps(spec, max_len)?;
        let e = spec.embedding;
        let f = spec.conv_filters;
        let mut layers = Vec::new();
        let mut info = |name: &str, kind: &str, shape: &[usize], n_params: usize| {
            layers.push(LayerInfo {
                name: name.to_string(),
                kind: kind.to_string(),
                output_shape: shape.to_vec(),
                n_params,
            });
        };

        let embedding = vb.get_with_hints((vocab_size, e), "embedding.weight", uniform(0.05))?;
        info("embedding", "Embedding", &[max_len, e], vocab_size * e);
        let positions = if spec.kind == ModelKind::Mha {
            info(
                "positional_encoding",
                "PositionalEncoding",
                &[max_len, e],
                0,
            );
            Some(sinusoidal_positions(max_len, e, vb.device())?)
        } else {
            None
        };

        let k = spec.conv_kernel;
        let conv_w = vb.get_with_hints((f, e, k), "conv.weight", glorot(e * k, f * k))?;
        let conv_b = vb.get_with_hints(f, "conv.bias", Init::Const(0.0))?;
        info("conv1d", "Conv1D", &[steps[0], f], f * e * k + f);

        let (body, body_width) = match spec.kind {
            ModelKind::Rnn | ModelKind::Gru => {
                let (cell, prefix, kind) = match spec.kind {
                    ModelKind::Rnn => (Cell::Rnn, "simple_rnn", "SimpleRNN"),
                    _ => (Cell::Gru, "gru", "GRU"),
                };
                let mut n_in = f;
                let mut modules = Vec::with_capacity(spec.modules);
                for i in 0..spec.modules {
                    let name = format!("{prefix}_{}", i + 1);
                    modules.push(RecurrentLayer::new(cell, n_in, spec.units, vb.pp(&name))?);
                    let n_params = RecurrentLayer::n_params(cell, n_in, spec.units);
                    info(&name, kind, &[steps[i], spec.units], n_params);
                    let pool = format!("average_pooling_{}", i + 1);
                    info(&pool, "AveragePooling1D", &[steps[i + 1], spec.units], 0);
                    n_in = spec.units;
                }
                let name = format!("{prefix}_final");
                let last = RecurrentLayer::new(cell, n_in, spec.final_units, vb.pp(&name))?;
                let n_params = RecurrentLayer::n_params(cell, n_in, spec.final_units);
                info(&name, kind, &[spec.final_units], n_params);
                (Body::Recurrent { modules, last }, spec.final_units)
            }
            ModelKind::Mha => {
                let (h, ks) = (spec.heads, spec.key_size);
                let attention_params = AttentionBlock::n_params_attention(f, h, ks);
                let mut modules = Vec::with_capacity(spec.modules);
                for i in 0..spec.modules {
                    let name = format!("attention_{}", i + 1);
                    modules.push(AttentionBlock::new(f, h, ks, vb.pp(&name))?);
                    info(
                        &name,
                        "MultiHeadAttention",
                        &[steps[i], f],
                        attention_params,
                    );
                    let norm = format!("layer_norm_{}", i + 1);
                    info(&norm, "LayerNormalization", &[steps[i], f], 2 * f);
                    let pool = format!("average_pooling_{}", i + 1);
                    info(&pool, "AveragePooling1D", &[steps[i + 1], f], 0);
                }
                let last = AttentionBlock::new(f, h, ks, vb.pp("attention_final"))?;
                let t = steps[spec.modules];
                info(
                    "attention_final",
                    "MultiHeadAttention",
                    &[t, f],
                    attention_params,
                );
                info("layer_norm_final", "LayerNormalization", &[t, f], 2 * f);
                info("global_max_pooling", "GlobalMaxPooling1D", &[f], 0);
                (Body::Attention { modules, last }, f)
            }
        };

        let mut n_in = body_width;
        let mut dense_layers = Vec::with_capacity(spec.dense.len());
        for (i, &units) in spec.dense.iter().enumerate() {
            if spec.dropout > 0.0 {
                info(&format!("dropout_{}", i + 1), "Dropout", &[n_in], 0);
            }
            let name = format!("dense_{}", i + 1);
            dense_layers.push(Dense::new(n_in, units, vb.pp(&name))?);
            info(&name, "Dense", &[units], n_in * units + units);
            n_in = units;
        }
        let output = Dense::new(n_in, n_classes, vb.pp("output"))?;
        info(
            "output",
            "Dense",
            &[n_classes],
            n_in * n_classes + n_classes,
        );

        Ok(Model {
            spec: spec.clone(),
            max_len,
            n_classes,
            embedding,
            positions,
            conv_w,
            conv_b,
            body,
            dense: dense_layers,
            output,
            recurrence: Recurrence::default(),
            attention: AttentionKernel::default(),
            dropout_rng: Mutex::new(SplitMix64::new(0)),
            layers,
        })
    }

    /// Chooses the recurrence implementation (the fused op by default; the
    /// composed one is the slow reference used in tests).
    pub fn with_recurrence(mut self, recurrence: Recurrence) -> Self {
        self.recurrence = recurrence;
        self
    }

    /// Chooses the attention implementation (the fused op on the CPU by
    /// default; the composed one is the slow reference).
    pub fn with_attention(mut self, kernel: AttentionKernel) -> Self {
        self.attention = kernel;
        self
    }

    /// The spec the model was built from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Number of output classes.
    pub fn n_classes(&self) -> usize {
        self.n_classes
    }

    /// The sequence length the model was built for.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Keras-like summary rows, in forward order.
    pub fn layers(&self) -> Vec<LayerInfo> {
        self.layers.clone()
    }

    /// Total trainable parameters.
    pub fn n_params(&self) -> usize {
        self.layers.iter().map(|l| l.n_params).sum()
    }

    /// State of the dropout mask stream (for checkpoints).
    pub fn dropout_state(&self) -> u64 {
        self.lock_dropout().state
    }

    /// Restarts the dropout mask stream at `state`.
    pub fn set_dropout_state(&self, state: u64) {
        self.lock_dropout().state = state;
    }

    fn lock_dropout(&self) -> std::sync::MutexGuard<'_, SplitMix64> {
        // The generator is a plain u64, valid even after a panic elsewhere.
        self.dropout_rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Logits for a batch.
    ///
    /// - `tokens`: `(B, L)` u32 token ids with `L <= max_len`.
    /// - `train`: applies dropout when true.
    ///
    /// Returns `(B, n_classes)` logits (no softmax).
    pub fn forward(&self, tokens: &Tensor, train: bool) -> Result<Tensor> {
        let (b, len) = tokens.dims2()?;
        if len > self.max_len {
            return Err(Error::InvalidModel(format!(
                "batch has sequences of length {len}, longer than max_len {}",
                self.max_len
            )));
        }
        time_steps(&self.spec, len)?;

        let e = self.spec.embedding;
        let mut xs = self
            .embedding
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, len, e))?;
        if let Some(pe) = &self.positions {
            // Scale the embedding by sqrt(E) before adding the encoding (as
            // in the original Transformer). Unscaled, the +-1 sinusoids drown
            // the +-0.05 initial embedding and the model never gets past the
            // majority class (measured: 0.46 vs 0.81 test accuracy on
            // pfam-real rotation 0 after 6 epochs, before the conv1d
            // gradient fix; not measured again since).
            xs = (xs * (e as f64).sqrt())?.broadcast_add(&pe.narrow(0, 0, len)?)?;
        }

        // Conv1D as one matmul over gathered windows: (B, L, E) -> (B, T0,
        // F). The bias and ELU come after the move to the body's layout, so
        // the bias is added along the last dimension.
        let conv = conv1d_windows(&xs, &self.conv_w, self.spec.conv_stride)?;
        let finish_conv =
            |xs: Tensor| -> Result<Tensor> { Ok(bias_elu(&xs.contiguous()?, &self.conv_b)?) };

        let pool = self.spec.pool;
        let mut xs = match &self.body {
            Body::Recurrent { modules, last } => {
                // Time-major (T0, B, F).
                let mut xs = finish_conv(conv.transpose(0, 1)?)?;
                for layer in modules {
                    xs = avg_pool(&layer.forward(&xs, self.recurrence)?, 0, pool)?;
                }
                let hs = last.forward(&xs, self.recurrence)?;
                let n_steps = hs.dim(0)?;
                hs.get(n_steps - 1)?
            }
            Body::Attention { modules, last } => {
                // Batch-major (B, T0, F).
                let mut xs = finish_conv(conv)?;
                for block in modules {
                    xs = avg_pool(&block.forward(&xs, self.attention)?, 1, pool)?;
                }
                last.forward(&xs, self.attention)?.max(1)?
            }
        };

        for layer in &self.dense {
            if train && self.spec.dropout > 0.0 {
                xs = self.dropout(&xs)?;
            }
            xs = layer.forward(&xs)?.elu(1.0)?;
        }
        self.output.forward(&xs)
    }

    /// Inverted dropout with a mask drawn from the model's own stream.
    fn dropout(&self, xs: &Tensor) -> Result<Tensor> {
        let p = self.spec.dropout;
        let scale = (1.0 / (1.0 - p)) as f32;
        let n = xs.elem_count();
        let mask: Vec<f32> = {
            let mut rng = self.lock_dropout();
            (0..n)
                .map(|_| if rng.next_f64() < p { 0.0 } else { scale })
                .collect()
        };
        let mask = Tensor::from_vec(mask, xs.shape(), xs.device())?.to_dtype(xs.dtype())?;
        Ok((xs * mask)?)
    }

    /// The L2 penalty: `spec.l2` times the sum of squares of every weight
    /// matrix (conv kernel, recurrent and attention weights, dense layers);
    /// biases, layer norms and the embedding are not penalised. A scalar.
    pub fn l2_penalty(&self) -> Result<Tensor> {
        let mut total = Tensor::zeros((), self.conv_w.dtype(), self.conv_w.device())?;
        if self.spec.l2 == 0.0 {
            return Ok(total);
        }
        for w in self.weight_matrices() {
            total = (total + w.sqr()?.sum_all()?)?;
        }
        Ok((total * self.spec.l2)?)
    }

    fn weight_matrices(&self) -> Vec<&Tensor> {
        let mut ws = vec![&self.conv_w];
        match &self.body {
            Body::Recurrent { modules, last } => {
                for layer in modules.iter().chain(std::iter::once(last)) {
                    ws.push(&layer.w_ih);
                    ws.push(&layer.w_hh);
                }
            }
            Body::Attention { modules, last } => {
                for block in modules.iter().chain(std::iter::once(last)) {
                    ws.extend(block.weights());
                }
            }
        }
        ws.extend(self.dense.iter().map(|d| &d.w));
        ws.push(&self.output.w);
        ws
    }
}

/// Conv1D ('valid', no padding or dilation) of `xs` `(B, L, E)` with the
/// kernel `w` `(F, E, K)` at `stride`: `(B, T0, F)` with `T0 = (L - K) /
/// stride + 1`, computed as one matmul of the gathered windows `(B, T0,
/// K*E)` with the kernel laid out as `(K*E, F)`.
///
/// candle's own `conv1d` returns wrong gradients for the kernel and the
/// input when the stride is above 1 (the default stride is 4): checked
/// against finite differences in `gradients_match_finite_differences`.
/// Every model's front learned from those gradients (mha suffered most:
/// 0.80 test accuracy against PyTorch's 0.87 on the same folds).
fn conv1d_windows(xs: &Tensor, w: &Tensor, stride: usize) -> Result<Tensor> {
    let (b, len, e) = xs.dims3()?;
    let (f, _, k) = w.dims3()?;
    let t0 = (len - k) / stride + 1;
    let windows = if k == stride {
        // Non-overlapping windows, side by side: a reshape.
        xs.narrow(1, 0, t0 * k)?.contiguous()?
    } else {
        let idx: Vec<u32> = (0..t0)
            .flat_map(|t| (0..k).map(move |j| (t * stride + j) as u32))
            .collect();
        let idx = Tensor::from_vec(idx, t0 * k, xs.device())?;
        xs.index_select(&idx, 1)?
    };
    // Row (t, j * E + c) of the windows meets kernel element w[f, c, j].
    let kernel = w.transpose(1, 2)?.contiguous()?.reshape((f, k * e))?;
    Ok(windows
        .reshape((b * t0, k * e))?
        .matmul(&kernel.t()?)?
        .reshape((b, t0, f))?)
}

/// Time steps after the convolution and after each pooling layer:
/// `[T0, T1, .., Tm]`. Errors naming `max_len` when any of them is zero.
fn time_steps(spec: &ModelSpec, max_len: usize) -> Result<Vec<usize>> {
    let (k, s, p) = (spec.conv_kernel, spec.conv_stride, spec.pool);
    // The shortest input that leaves one step after every pooling layer.
    let min_len = k.saturating_add(s.saturating_mul(p.saturating_pow(spec.modules as u32) - 1));
    let too_short = |stage: String| Error::SequenceTooShort {
        max_len,
        min_len,
        stage,
    };

    if max_len < k {
        return Err(too_short(format!("conv1d (kernel {k})")));
    }
    let mut steps = vec![(max_len - k) / s + 1];
    for i in 0..spec.modules {
        let t = steps[i] / p;
        if t == 0 {
            return Err(too_short(format!("average_pooling_{} (pool {p})", i + 1)));
        }
        steps.push(t);
    }
    Ok(steps)
}

/// `PE[pos, 2i] = sin(pos / 10000^(2i/E))`, `PE[pos, 2i+1] = cos(..)`;
/// `(len, E)`.
fn sinusoidal_positions(len: usize, width: usize, device: &Device) -> Result<Tensor> {
    let mut values = Vec::with_capacity(len * width);
    for pos in 0..len {
        for j in 0..width {
            let angle = pos as f64 / 10000f64.powf((j / 2 * 2) as f64 / width as f64);
            values.push(if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32);
        }
    }
    Ok(Tensor::from_vec(values, (len, width), device)?)
}

/// A dense layer: weight `(out, in)` (Glorot uniform), bias `(out)` (zero).
struct Dense {
    w: Tensor,
    b: Tensor,
}

impl Dense {
    fn new(n_in: usize, n_out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            w: vb.get_with_hints((n_out, n_in), "weight", glorot(n_in, n_out))?,
            b: vb.get_with_hints(n_out, "bias", Init::Const(0.0))?,
        })
    }

    /// `(.., in)` -> `(.., out)`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        linear(xs, &self.w, &self.b)
    }
}

/// `xs w^T + b` over the last dimension: `xs` `(.., in)`, `w` `(out, in)`,
/// `b` `(out)` -> `(.., out)`.
fn linear(xs: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let mut dims = xs.dims().to_vec();
    let n_in = dims.pop().unwrap_or(1);
    let rows: usize = dims.iter().product();
    let ys = xs.reshape((rows, n_in))?.matmul(&w.t()?)?;
    let ys = add_bias(&ys, b)?;
    dims.push(w.dim(0)?);
    Ok(ys.reshape(dims)?)
}

/// Glorot (Xavier) uniform, the Keras default kernel initialiser.
fn glorot(fan_in: usize, fan_out: usize) -> Init {
    uniform((6.0 / (fan_in + fan_out) as f64).sqrt())
}

fn uniform(limit: f64) -> Init {
    Init::Uniform {
        lo: -limit,
        up: limit,
    }
}

/// A variable store whose random initial values depend only on a seed and
/// the variable's name, so a job initialises identically on every worker
/// and every run (candle's own CPU generator cannot be seeded).
struct SeededInit {
    varmap: VarMap,
    seed: u64,
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        init: Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut vars = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("variable map lock poisoned".into()))?;
        if let Some(var) = vars.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("shape mismatch on {name}: {shape:?} <> {:?}", var.shape())
            }
            return Ok(var.as_tensor().clone());
        }

        let mut rng = SplitMix64::new(mix_seed(&[self.seed, fnv1a(name)]));
        let values = initial_values(&shape, init, &mut rng);
        let tensor = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
        let var = Var::from_tensor(&tensor)?;
        let out = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("seeded variable store needs a shape for `{name}`")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|vars| vars.contains_key(name))
            .unwrap_or(false)
    }
}

/// A `VarBuilder` that creates missing variables in `varmap` from `seed`
/// (deterministically per variable name) and reuses existing ones.
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    let backend = SeededInit {
        varmap: varmap.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
}

fn initial_values(shape: &Shape, init: Init, rng: &mut SplitMix64) -> Vec<f32> {
    let n = shape.elem_count();
    let mut normal = || {
        // Box-Muller; 1 - u keeps the logarithm finite.
        let u = 1.0 - rng.next_f64();
        let v = rng.next_f64();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    };
    match init {
        Init::Const(c) => vec![c as f32; n],
        Init::Uniform { lo, up } => (0..n)
            .map(|_| (lo + (up - lo) * rng.next_f64()) as f32)
            .collect(),
        Init::Randn { mean, stdev } => (0..n).map(|_| (mean + stdev * normal()) as f32).collect(),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                candle_nn::init::NormalOrUniform::Normal => {
                    (0..n).map(|_| (std * normal()) as f32).collect()
                }
                candle_nn::init::NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    (0..n)
                        .map(|_| (bound * (2.0 * rng.next_f64() - 1.0)) as f32)
                        .collect()
                }
            }
        }
    }
}

/// FNV-1a, to turn a variable name into a seed part.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The variables of `varmap` sorted by name (a stable order for the
/// optimiser and for comparisons).
pub fn sorted_vars(varmap: &VarMap) -> Vec<(String, Var)> {
    let vars = varmap
        .data()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut out: Vec<(String, Var)> = vars.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// A deep copy of every variable's current value, by name.
pub fn snapshot(varmap: &VarMap) -> Result<HashMap<String, Tensor>> {
    sorted_vars(varmap)
        .into_iter()
        .map(|(name, var)| Ok((name, var.as_tensor().copy()?)))
        .collect()
}

/// Sets every variable of `varmap` from `values` (e.g. a [`snapshot`]).
/// Errors if a variable is missing from `values` or has another shape.
pub fn restore(varmap: &VarMap, values: &HashMap<String, Tensor>) -> Result<()> {
    for (name, var) in sorted_vars(varmap) {
        let value = values.get(&name).ok_or_else(|| {
            Error::InvalidModel(format!("saved weights have no variable `{name}`"))
        })?;
        var.set(value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recurrent::Recurrence;

    fn cpu() -> Device {
        Device::Cpu
    }

    fn build(
        spec: &ModelSpec,
        vocab: usize,
        classes: usize,
        len: usize,
    ) -> Result<(Model, VarMap)> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, 42, &cpu());
        let model = Model::new(spec, vocab, classes, len, vb)?;
        Ok((model, varmap))
    }

    fn random_tokens(b: usize, len: usize, vocab: usize, seed: u64) -> Result<Tensor> {
        let mut rng = SplitMix64::new(seed);
        let ids: Vec<u32> = (0..b * len)
            .map(|_| rng.below(vocab as u64) as u32)
            .collect();
        Ok(Tensor::from_vec(ids, (b, len), &cpu())?)
    }

    #[test]
    fn default_parameter_counts_match_the_reference_models() -> Result<()> {
        // research/baselines.md: Keras counts with vocabulary 27, 46 classes.
        for (kind, expected) in [
            (ModelKind::Rnn, 33_390),
            (ModelKind::Gru, 66_798),
            (ModelKind::Mha, 50_414),
        ] {
            let (model, varmap) = build(&ModelSpec::new(kind), 27, 46, 256)?;
            assert_eq!(model.n_params(), expected, "{kind:?} summary");
            let stored: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
            assert_eq!(stored, expected, "{kind:?} variables");
        }
        Ok(())
    }

    #[test]
    fn outputs_and_layer_shapes_follow_the_architecture() -> Result<()> {
        for kind in [ModelKind::Rnn, ModelKind::Gru, ModelKind::Mha] {
            let (model, _) = build(&ModelSpec::new(kind), 27, 5, 64)?;
            let logits = model.forward(&random_tokens(3, 64, 27, 1)?, false)?;
            assert_eq!(logits.dims(), &[3, 5], "{kind:?}");

            // L = 64 -> conv (64 - 4) / 4 + 1 = 16 steps -> pool 8.
            let layers = model.layers();
            let conv = layers
                .iter()
                .find(|l| l.name == "conv1d")
                .expect("conv layer");
            assert_eq!(conv.output_shape, vec![16, 64]);
            let pool = layers
                .iter()
                .find(|l| l.name == "average_pooling_1")
                .expect("pool layer");
            assert_eq!(pool.output_shape[0], 8);
            assert_eq!(layers.last().map(|l| l.output_shape.clone()), Some(vec![5]));
        }

        let mut spec = ModelSpec::new(ModelKind::Gru);
        spec.modules = 2;
        spec.dense = vec![16];
        let (model, _) = build(&spec, 27, 4, 64)?;
        assert_eq!(
            model.forward(&random_tokens(2, 64, 27, 2)?, true)?.dims(),
            &[2, 4]
        );
        Ok(())
    }

    #[test]
    fn too_short_sequences_are_an_error_naming_max_len() {
        let spec = ModelSpec::new(ModelKind::Rnn);
        // conv leaves (7 - 4) / 4 + 1 = 1 step, which pooling by 2 empties.
        let err = build(&spec, 27, 5, 7).err().expect("too short").to_string();
        assert!(
            err.contains("max_len 7") && err.contains("max_len >= 8"),
            "{err}"
        );
        assert!(err.contains("average_pooling_1"), "{err}");
        let err = build(&spec, 27, 5, 3).err().expect("too short").to_string();
        assert!(err.contains("conv1d"), "{err}");
        assert!(build(&spec, 27, 5, 8).is_ok());
    }

    /// Reference values for the two step tests, produced with:
    ///
    /// ```text
    /// import numpy as np
    /// x = np.array([[[0.5, -1.0, 0.25]], [[-0.3, 0.8, 1.2]]])  # (T, B, In)
    /// w_ih = np.array([[0.1, -0.2, 0.3], [0.4, 0.5, -0.6]])
    /// b = np.array([0.05, -0.1])
    /// w_hh = np.array([[0.7, -0.3], [0.2, 0.9]])
    /// h = np.zeros(2)
    /// for t in range(2):
    ///     h = np.tanh(x[t, 0] @ w_ih.T + b + h @ w_hh.T); print("rnn", t, repr(h))
    /// gw_ih = np.array([[0.2, -0.1, 0.4], [-0.3, 0.6, 0.1], [0.5, 0.2, -0.4],
    ///                   [0.1, 0.3, 0.2], [-0.2, -0.5, 0.3], [0.4, -0.1, 0.6]])
    /// gw_hh = np.array([[0.3, -0.2], [0.1, 0.4], [-0.5, 0.2], [0.6, 0.1],
    ///                   [0.2, -0.3], [-0.1, 0.5]])
    /// gb_ih = np.array([0.1, -0.1, 0.05, 0.0, 0.2, -0.2])
    /// gb_hh = np.array([-0.05, 0.1, 0.0, 0.15, -0.1, 0.3])
    /// sig = lambda v: 1 / (1 + np.exp(-v))
    /// h = np.zeros(2)
    /// for t in range(2):
    ///     xp = x[t, 0] @ gw_ih.T + gb_ih; hp = h @ gw_hh.T + gb_hh
    ///     r = sig(xp[0:2] + hp[0:2]); z = sig(xp[2:4] + hp[2:4])
    ///     n = np.tanh(xp[4:6] + r * hp[4:6]); h = (1 - z) * n + z * h
    ///     print("gru", t, repr(h))
    /// ```
    const STEP_INPUT: [f32; 6] = [0.5, -1.0, 0.25, -0.3, 0.8, 1.2];

    fn layer_from(tensors: &[(&str, &[f32], &[usize])], cell: Cell) -> Result<RecurrentLayer> {
        let mut map = HashMap::new();
        for (name, values, shape) in tensors {
            map.insert(
                name.to_string(),
                Tensor::from_slice(values, *shape, &cpu())?,
            );
        }
        let vb = VarBuilder::from_tensors(map, DType::F32, &cpu());
        RecurrentLayer::new(cell, 3, 2, vb)
    }

    fn assert_close(got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < tol, "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn simple_rnn_steps_match_numpy() -> Result<()> {
        let layer = layer_from(
            &[
                ("w_ih", &[0.1, -0.2, 0.3, 0.4, 0.5, -0.6], &[2, 3]),
                ("b_ih", &[0.05, -0.1], &[2]),
                ("w_hh", &[0.7, -0.3, 0.2, 0.9], &[2, 2]),
            ],
            Cell::Rnn,
        )?;
        let xs = Tensor::from_slice(&STEP_INPUT, (2, 1, 3), &cpu())?;
        let want = [0.358_357_4, -0.500_520_2, 0.551_828_24, -0.725_327_7];
        for how in [Recurrence::Fused, Recurrence::Composed] {
            let hs = layer.forward(&xs, how)?.flatten_all()?.to_vec1::<f32>()?;
            assert_close(&hs, &want, 1e-6);
        }
        Ok(())
    }

    #[test]
    fn gru_steps_match_numpy() -> Result<()> {
        let w_ih = [
            0.2, -0.1, 0.4, -0.3, 0.6, 0.1, 0.5, 0.2, -0.4, 0.1, 0.3, 0.2, -0.2, -0.5, 0.3, 0.4,
            -0.1, 0.6,
        ];
        let w_hh = [
            0.3, -0.2, 0.1, 0.4, -0.5, 0.2, 0.6, 0.1, 0.2, -0.3, -0.1, 0.5,
        ];
        let layer = layer_from(
            &[
                ("w_ih", &w_ih, &[6, 3]),
                ("b_ih", &[0.1, -0.1, 0.05, 0.0, 0.2, -0.2], &[6]),
                ("w_hh", &w_hh, &[6, 2]),
                ("b_hh", &[-0.05, 0.1, 0.0, 0.15, -0.1, 0.3], &[6]),
            ],
            Cell::Gru,
        )?;
        let xs = Tensor::from_slice(&STEP_INPUT, (2, 1, 3), &cpu())?;
        let want = [0.274_286_7, 0.171_430_93, 0.202_485_9, 0.278_513_98];
        for how in [Recurrence::Fused, Recurrence::Composed] {
            let hs = layer.forward(&xs, how)?.flatten_all()?.to_vec1::<f32>()?;
            assert_close(&hs, &want, 1e-6);
        }
        Ok(())
    }

    fn random_var(shape: &[usize], rng: &mut SplitMix64) -> Result<Var> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (rng.next_f64() * 2.0 - 1.0) as f32)
            .collect();
        Ok(Var::from_tensor(&Tensor::from_vec(values, shape, &cpu())?)?)
    }

    /// Values and gradients of the fused ops equal the per-step composition.
    #[test]
    fn fused_recurrences_match_the_composition_with_gradients() -> Result<()> {
        let mut rng = SplitMix64::new(11);
        // h = 11: no whole SIMD chunk, and a remainder past one; b = 35:
        // two blocks of rows (32 + 3).
        let cases = [
            (Cell::Rnn, 5, 3),
            (Cell::Gru, 5, 3),
            (Cell::Gru, 1, 3),
            (Cell::Rnn, 1, 3),
            (Cell::Rnn, 3, 35),
            (Cell::Gru, 3, 35),
        ];
        for (cell, n_steps, b) in cases {
            let h = 11;
            let g = cell.gates() * h;
            let xp = random_var(&[n_steps, b, g], &mut rng)?;
            let w = random_var(&[g, h], &mut rng)?;
            let bias = random_var(&[g], &mut rng)?;
            let probe = random_var(&[n_steps, b, h], &mut rng)?;

            let mut results = Vec::new();
            // The CPU kernel (Fused here), the tensor-op version used on
            // CUDA, and the per-step composition.
            for how in [Some(Recurrence::Fused), None, Some(Recurrence::Composed)] {
                let (x, wt, bt) = (xp.as_tensor(), w.as_tensor(), bias.as_tensor());
                let hs = match (cell, how) {
                    (Cell::Rnn, Some(how)) => rnn_sequence(x, wt, how)?,
                    (Cell::Rnn, None) => crate::recurrent::rnn_ops(x, wt)?,
                    (Cell::Gru, Some(how)) => gru_sequence(x, wt, bt, how)?,
                    (Cell::Gru, None) => crate::recurrent::gru_ops(x, wt, bt)?,
                };
                let grads = (&hs * probe.as_tensor())?.sum_all()?.backward()?;
                let mut flat = vec![hs.flatten_all()?.to_vec1::<f32>()?];
                let vars = if cell == Cell::Gru {
                    vec![&xp, &w, &bias]
                } else {
                    vec![&xp, &w]
                };
                for var in vars {
                    let grad = grads
                        .get(var.as_tensor())
                        .expect("every input has a gradient");
                    flat.push(grad.flatten_all()?.to_vec1::<f32>()?);
                }
                results.push(flat);
            }
            for other in &results[..2] {
                for (fused, composed) in other.iter().zip(&results[2]) {
                    assert_close(fused, composed, 1e-5);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn recurrences_give_the_same_bits_on_any_number_of_threads() -> Result<()> {
        let mut rng = SplitMix64::new(12);
        // 3 rows: split by thread count they were 3, 1 + 2 or 1 + 1 + 1 rows,
        // and the GRU's bits differed; 35 rows: two blocks.
        for (cell, b) in [(Cell::Rnn, 3), (Cell::Gru, 3), (Cell::Gru, 35)] {
            let (n_steps, h) = (6, 64);
            let g = cell.gates() * h;
            let xp = random_var(&[n_steps, b, g], &mut rng)?;
            let w = random_var(&[g, h], &mut rng)?;
            let bias = random_var(&[g], &mut rng)?;
            let probe = random_var(&[n_steps, b, h], &mut rng)?;
            let run = |threads: usize| -> Result<Vec<Vec<f32>>> {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("a thread pool");
                pool.install(|| {
                    let (x, wt, bt) = (xp.as_tensor(), w.as_tensor(), bias.as_tensor());
                    let hs = match cell {
                        Cell::Rnn => rnn_sequence(x, wt, Recurrence::Fused)?,
                        Cell::Gru => gru_sequence(x, wt, bt, Recurrence::Fused)?,
                    };
                    let grads = (&hs * probe.as_tensor())?.sum_all()?.backward()?;
                    let mut out = vec![hs.flatten_all()?.to_vec1::<f32>()?];
                    for var in [&xp, &w] {
                        let grad = grads.get(var.as_tensor()).expect("a gradient");
                        out.push(grad.flatten_all()?.to_vec1::<f32>()?);
                    }
                    Ok(out)
                })
            };
            let one = run(1)?;
            for threads in [2, 3] {
                assert!(run(threads)? == one, "{cell:?} on {threads} threads");
            }
        }
        Ok(())
    }

    /// Each parameter's gradient, along a random direction, against the
    /// central difference of the loss: the whole model end to end, custom
    /// ops and all. Regression: candle's conv1d gave wrong kernel and input
    /// gradients at stride 4 (e.g. -0.244 against 0.128 for rnn's kernel).
    #[test]
    fn gradients_match_finite_differences() -> Result<()> {
        let cases = [
            (ModelKind::Rnn, 4),
            (ModelKind::Gru, 4),
            (ModelKind::Mha, 4),
            // Overlapping windows (kernel 4, stride 2).
            (ModelKind::Gru, 2),
        ];
        for (kind, stride) in cases {
            let mut spec = ModelSpec::new(kind);
            spec.conv_stride = stride;
            spec.embedding = 4;
            spec.conv_filters = 8;
            spec.units = 8;
            spec.final_units = 8;
            spec.heads = 2;
            spec.key_size = 4;
            spec.dense = vec![8];
            let (model, varmap) = build(&spec, 7, 3, 32)?;
            let tokens = random_tokens(3, 32, 7, 5)?;
            let labels = Tensor::new(&[0u32, 1, 2], &cpu())?;
            let loss = |m: &Model| -> Result<f64> {
                let logits = m.forward(&tokens, false)?;
                Ok(candle_nn::loss::cross_entropy(&logits, &labels)?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?)
            };
            let logits = model.forward(&tokens, false)?;
            let grads = candle_nn::loss::cross_entropy(&logits, &labels)?.backward()?;
            let mut rng = SplitMix64::new(9);
            for (name, var) in sorted_vars(&varmap) {
                // A copy: `set` writes into the variable's own storage.
                let t = var.as_tensor().detach().copy()?;
                let n = t.elem_count();
                let dir: Vec<f32> = (0..n)
                    .map(|_| if rng.below(2) == 0 { -1.0 } else { 1.0 })
                    .collect();
                let dir = Tensor::from_vec(dir, t.shape(), &cpu())?;
                let g = grads.get(var.as_tensor()).expect("a gradient");
                let analytic = (g * &dir)?.sum_all()?.to_scalar::<f32>()? as f64;
                let eps = 1e-3;
                var.set(&(&t + (&dir * eps)?)?)?;
                let up = loss(&model)?;
                var.set(&(&t - (&dir * eps)?)?)?;
                let down = loss(&model)?;
                var.set(&t)?;
                let numeric = (up - down) / (2.0 * eps);
                assert!(
                    (analytic - numeric).abs() <= 2e-3 + 0.02 * numeric.abs(),
                    "{kind:?} stride {stride} {name}: gradient {analytic:.5}, \
                     finite difference {numeric:.5}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn every_parameter_of_every_model_gets_a_gradient() -> Result<()> {
        for kind in [ModelKind::Rnn, ModelKind::Gru, ModelKind::Mha] {
            let mut spec = ModelSpec::new(kind);
            spec.dropout = 0.2;
            spec.l2 = 1e-3;
            let (model, varmap) = build(&spec, 27, 5, 64)?;
            let logits = model.forward(&random_tokens(4, 64, 27, 3)?, true)?;
            let labels = Tensor::new(&[0u32, 1, 2, 4], &cpu())?;
            let loss = (candle_nn::loss::cross_entropy(&logits, &labels)? + model.l2_penalty()?)?;
            let grads = loss.backward()?;

            let vars = sorted_vars(&varmap);
            assert!(vars.len() > 10, "{kind:?} has {} variables", vars.len());
            for (name, var) in vars {
                let grad = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{kind:?}: no gradient for {name}"));
                let norm = grad.abs()?.sum_all()?.to_scalar::<f32>()?;
                assert!(
                    norm > 0.0 && norm.is_finite(),
                    "{kind:?}: {name} gradient {norm}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn seeded_initialisation_depends_on_seed_and_name_only() -> Result<()> {
        let spec = ModelSpec::new(ModelKind::Mha);
        let (_, a) = build(&spec, 27, 5, 64)?;
        let (_, b) = build(&spec, 27, 5, 64)?;
        let other = VarMap::new();
        Model::new(&spec, 27, 5, 64, seeded_var_builder(&other, 43, &cpu()))?;

        let values = |m: &VarMap| -> Result<Vec<f32>> {
            let t = m.data().lock().expect("fresh lock")["dense_1.weight"]
                .as_tensor()
                .clone();
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        assert_eq!(values(&a)?, values(&b)?);
        assert_ne!(values(&a)?, values(&other)?);
        Ok(())
    }

    #[test]
    fn l2_penalty_is_the_scaled_sum_of_squared_weight_matrices() -> Result<()> {
        let mut spec = ModelSpec::new(ModelKind::Rnn);
        spec.l2 = 0.5;
        let (model, _) = build(&spec, 27, 5, 64)?;
        let mut want = 0.0f64;
        for w in model.weight_matrices() {
            want += f64::from(w.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        let got = f64::from(model.l2_penalty()?.to_scalar::<f32>()?);
        assert!(
            (got - 0.5 * want).abs() < 1e-3 * want,
            "{got} vs {}",
            0.5 * want
        );
        // conv + 2 x (w_ih, w_hh) + 2 dense + output.
        assert_eq!(model.weight_matrices().len(), 8);
        Ok(())
    }
}
