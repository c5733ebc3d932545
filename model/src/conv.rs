//! Convolution and pooling as dfdx tape operations, on stable Rust.
//!
//! dfdx 0.13 keeps its own convolution and pooling behind its `nightly`
//! feature, so these are ours. A batch travels as a `[batch, C·H·W]`
//! matrix (channels first, like PyTorch); each op knows its image shape.
//!
//! A convolution unfolds its input (im2col: one row of `C·k·k` values per
//! output position) and multiplies by the weight with dfdx's matmul. Its
//! backward pass, recorded on the tape like any dfdx op, multiplies the
//! output gradient by the unfolded input (weight gradient) and by the
//! weight (unfolded input gradient, folded back). Every sum runs in a
//! fixed order, so the same inputs give the same bits on every run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use dfdx::prelude::*;
use rayon::prelude::*;

use crate::stage::{Mat, Vector};

/// Shape of one convolution: input `[c, h, w]`, `oc` output channels,
/// square kernel `k`, stride `s`, zero padding `p`, output `[oc, oh, ow]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ConvGeom {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub oc: usize,
    pub k: usize,
    pub s: usize,
    pub p: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    /// Values in one unfolded row (`c·k·k`).
    fn row(&self) -> usize {
        self.c * self.k * self.k
    }

    /// Output positions per image (`oh·ow`).
    fn positions(&self) -> usize {
        self.oh * self.ow
    }

    fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }

    /// Walks the unfolded rows of one image in order: for each output
    /// position, input channel and kernel row, calls `f(at, run)` where
    /// `at` is where the kernel row starts in the unfolded row-major
    /// `[positions, row]` matrix and `run` is the part of it inside the
    /// image: `(kernel columns, input index of the first)`, or `None` when
    /// the whole kernel row lies on padding. Within a kernel row the input
    /// columns are consecutive, whatever the stride.
    #[inline]
    fn for_each_run(&self, mut f: impl FnMut(usize, Option<(std::ops::Range<usize>, usize)>)) {
        let (k, s, p) = (self.k, self.s, self.p);
        let row = self.row();
        for oy in 0..self.oh {
            for ox in 0..self.ow {
                // Input column of kernel column kj: ox·s + kj - p.
                let x0 = ox * s;
                let lo = p.saturating_sub(x0).min(k);
                let hi = (self.w + p).saturating_sub(x0).min(k).max(lo);
                let mut at = (oy * self.ow + ox) * row;
                for ci in 0..self.c {
                    let plane = ci * self.h * self.w;
                    for ki in 0..k {
                        let iy = (oy * s + ki).wrapping_sub(p);
                        if iy >= self.h || lo == hi {
                            f(at, None);
                        } else {
                            f(at, Some((lo..hi, plane + iy * self.w + x0 + lo - p)));
                        }
                        at += k;
                    }
                }
            }
        }
    }

    /// im2col of one image: `cols` is `[positions, row]`, zero where the
    /// kernel lies on padding.
    fn unfold(&self, x: &[f32], cols: &mut [f32]) {
        let k = self.k;
        self.for_each_run(|at, run| {
            let dst = &mut cols[at..at + k];
            match run {
                None => dst.fill(0.0),
                Some((cols_in, start)) => {
                    let n = cols_in.len();
                    dst[..cols_in.start].fill(0.0);
                    dst[cols_in.end..].fill(0.0);
                    dst[cols_in].copy_from_slice(&x[start..start + n]);
                }
            }
        });
    }

    /// Whole images per block: as many as keep the unfolded block within
    /// [`BLOCK_VALUES`], at least one.
    fn block_images(&self) -> usize {
        (BLOCK_VALUES / (self.positions() * self.row()).max(1)).max(1)
    }

    /// The unfolded input of a block of whole images, `[images·pos, row]`.
    fn unfold_block(&self, dev: &Cpu, xb: &[f32]) -> Mat {
        let images = xb.len() / self.in_len();
        let per_image = self.positions() * self.row();
        let mut cols = vec![0.0f32; images * per_image];
        for (img, c) in xb
            .chunks_exact(self.in_len())
            .zip(cols.chunks_exact_mut(per_image))
        {
            self.unfold(img, c);
        }
        dev.tensor_from_vec(cols, (images * self.positions(), self.row()))
    }

    /// `[images·pos, oc]` (a product's layout) to `[images, oc, pos]`
    /// (channels first), adding the bias when there is one.
    fn channels_first(&self, src: &[f32], dst: &mut [f32], bias: Option<&[f32]>) {
        let (pos, oc) = (self.positions(), self.oc);
        for (s, d) in src
            .chunks_exact(pos * oc)
            .zip(dst.chunks_exact_mut(oc * pos))
        {
            for (p, vals) in s.chunks_exact(oc).enumerate() {
                for (o, v) in vals.iter().enumerate() {
                    d[o * pos + p] = match bias {
                        Some(b) => v + b[o],
                        None => *v,
                    };
                }
            }
        }
    }

    /// `[images, oc, pos]` to `[images·pos, oc]`.
    fn positions_first(&self, src: &[f32]) -> Vec<f32> {
        let (pos, oc) = (self.positions(), self.oc);
        let mut out = vec![0.0f32; src.len()];
        for (s, d) in src
            .chunks_exact(oc * pos)
            .zip(out.chunks_exact_mut(pos * oc))
        {
            for (o, run) in s.chunks_exact(pos).enumerate() {
                for (p, v) in run.iter().enumerate() {
                    d[p * oc + o] = *v;
                }
            }
        }
        out
    }

    /// Per channel, the sum over the rows of a `[rows, oc]` matrix, in
    /// row order.
    fn position_sums(&self, gt: &[f32]) -> Vec<f32> {
        let mut sums = vec![0.0f32; self.oc];
        for vals in gt.chunks_exact(self.oc) {
            for (s, v) in sums.iter_mut().zip(vals) {
                *s += v;
            }
        }
        sums
    }

    /// col2im of one image: adds each unfolded gradient to the input value
    /// it came from, in the order of the unfolded rows.
    fn fold_add(&self, gcols: &[f32], gx: &mut [f32]) {
        self.for_each_run(|at, run| {
            if let Some((cols_in, start)) = run {
                let n = cols_in.len();
                let src = &gcols[at + cols_in.start..at + cols_in.end];
                for (d, s) in gx[start..start + n].iter_mut().zip(src) {
                    *d += s;
                }
            }
        });
    }
}

/// The values of a contiguous tensor (a memcpy; dfdx's `as_vec` walks
/// them one index at a time).
pub(crate) fn values(t: &Mat) -> Vec<f32> {
    let (r, c) = *t.shape();
    let mut v = vec![0.0f32; r * c];
    t.copy_into(&mut v);
    v
}

/// Unfolded values per block of images: a block's unfolded input (and its
/// gradient) stays in cache while it is multiplied, is unfolded again in
/// the backward pass instead of being kept for it, and blocks run on all
/// cores. About 1 MiB.
const BLOCK_VALUES: usize = 1 << 18;

/// `y = conv2d(x, weight) + bias`: `x` is `[n, c·h·w]`, `weight` is
/// `[oc, c·k·k]` (PyTorch's `[oc, c, k, k]`, row-major), `bias` `[oc]`;
/// `y` is `[n, oc·oh·ow]`. While `skip_input_grad` is set, the backward
/// pass leaves the input's gradient out (the first stage needs none).
///
/// The batch runs in blocks of whole images ([`BLOCK_VALUES`]); the
/// weight and bias gradients are summed over blocks in block order, so
/// the result does not depend on how many threads ran the blocks.
pub(crate) fn conv2d<T: Tape<f32, Cpu>>(
    g: &ConvGeom,
    x: Mat<T>,
    weight: &Mat,
    bias: Option<&Vector>,
    skip_input_grad: &Arc<AtomicBool>,
) -> Mat<T> {
    let (x, mut tape) = x.split_tape();
    let dev = x.device().clone();
    let n = x.shape().0;
    let (in_len, out_len) = (g.in_len(), g.oc * g.positions());
    let block = g.block_images();
    let xs = values(&x);
    let mut b = vec![0.0f32; g.oc];
    if let Some(bias) = bias {
        bias.copy_into(&mut b);
    }
    let with_bias = bias.is_some();
    let wt = weight.clone().permute::<(usize, usize), Axes2<1, 0>>();
    let mut y = vec![0.0f32; n * out_len];
    xs.par_chunks(block * in_len)
        .zip(y.par_chunks_mut(block * out_len))
        .for_each(|(xb, yb)| {
            let cols = g.unfold_block(&dev, xb);
            // [images·pos, oc] = cols · weightᵀ: the long side of the
            // product is the one gemm's kernels tile best.
            let yt = values(&cols.matmul(wt.clone()));
            g.channels_first(&yt, yb, with_bias.then_some(&b[..]));
        });
    let out: Mat = dev.tensor_from_vec(y, (n, out_len));
    if T::OWNS_TAPE {
        let geom = *g;
        let (x_id, w_id, o_id) = (x.ghost(), weight.ghost(), out.ghost());
        let b_id = bias.map(|b| b.ghost());
        let weight = weight.clone();
        let skip_input_grad = Arc::clone(skip_input_grad);
        tape.add_backward_op(move |grads| {
            let g = &geom;
            // Nothing reads the output's gradient after this operation:
            // take it instead of copying it.
            let gy = std::mem::take(&mut **grads.get_or_alloc_mut(&o_id)?);
            let want_input = !skip_input_grad.load(Ordering::Relaxed);
            // The input's gradient, taken out to add into block by block
            // and put back at the end.
            let mut gx = if want_input {
                std::mem::take(&mut **grads.get_or_alloc_mut(&x_id)?)
            } else {
                Vec::new()
            };
            // One block: its share of the weight and bias gradients, and
            // (when wanted) its images' input gradients.
            let one = |xb: &[f32], gyb: &[f32], gxb: Option<&mut [f32]>| {
                let images = xb.len() / in_len;
                let gt = g.positions_first(gyb);
                let gb = g.position_sums(&gt);
                let gt: Mat = dev.tensor_from_vec(gt, (images * g.positions(), g.oc));
                let cols = g.unfold_block(&dev, xb);
                // Weight: [oc, row] = gtᵀ · cols.
                let gw = values(
                    &gt.clone()
                        .permute::<(usize, usize), Axes2<1, 0>>()
                        .matmul(cols),
                );
                if let Some(gxb) = gxb {
                    // Input: [images·pos, row] = gt · weight, folded back.
                    let gcols = values(&gt.matmul(weight.clone()));
                    for (gimg, gc) in gxb
                        .chunks_exact_mut(in_len)
                        .zip(gcols.chunks_exact(g.positions() * g.row()))
                    {
                        g.fold_add(gc, gimg);
                    }
                }
                (gw, gb)
            };
            let blocks = xs
                .par_chunks(block * in_len)
                .zip(gy.par_chunks(block * out_len));
            let parts: Vec<(Vec<f32>, Vec<f32>)> = if want_input {
                blocks
                    .zip(gx.par_chunks_mut(block * in_len))
                    .map(|((xb, gyb), gxb)| one(xb, gyb, Some(gxb)))
                    .collect()
            } else {
                blocks.map(|(xb, gyb)| one(xb, gyb, None)).collect()
            };
            if let Some(b_id) = &b_id {
                let dst = grads.get_or_alloc_mut(b_id)?;
                for (_, gb) in &parts {
                    for (d, s) in dst.iter_mut().zip(gb) {
                        *d += s;
                    }
                }
            }
            {
                let dst = grads.get_or_alloc_mut(&w_id)?;
                for (gw, _) in &parts {
                    for (d, s) in dst.iter_mut().zip(gw) {
                        *d += s;
                    }
                }
            }
            if want_input {
                **grads.get_or_alloc_mut(&x_id)? = gx;
            }
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// Shape of one pooling layer: input `[c, h, w]`, square window `k`
/// moved `s` at a time, output `[c, oh, ow]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PoolGeom {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub s: usize,
    pub oh: usize,
    pub ow: usize,
}

impl PoolGeom {
    fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }

    fn out_len(&self) -> usize {
        self.c * self.oh * self.ow
    }

    /// The input index of each window's top-left value, in output order.
    fn corners(&self) -> Vec<usize> {
        let mut out = Vec::with_capacity(self.out_len());
        for ci in 0..self.c {
            for oy in 0..self.oh {
                for ox in 0..self.ow {
                    out.push((ci * self.h + oy * self.s) * self.w + ox * self.s);
                }
            }
        }
        out
    }
}

/// The largest value of each window (the first one on ties); the backward
/// pass sends each output's gradient to that value.
pub(crate) fn max_pool2d<T: Tape<f32, Cpu>>(g: &PoolGeom, x: Mat<T>) -> Mat<T> {
    let (x, mut tape) = x.split_tape();
    let dev = x.device().clone();
    let n = x.shape().0;
    let xs = values(&x);
    let (in_len, out_len) = (g.in_len(), g.out_len());
    let mut y = vec![0.0f32; n * out_len];
    // Index of the chosen value within its image, for the backward pass.
    let mut arg = vec![0u32; if T::OWNS_TAPE { n * out_len } else { 0 }];
    let corners = g.corners();
    // One image: each window's largest value and where it is.
    let pool = |xi: &[f32], yi: &mut [f32], mut ai: Option<&mut [u32]>| {
        for (o, &corner) in corners.iter().enumerate() {
            let mut best = corner;
            for ki in 0..g.k {
                for kj in 0..g.k {
                    let i = corner + ki * g.w + kj;
                    if xi[i] > xi[best] {
                        best = i;
                    }
                }
            }
            yi[o] = xi[best];
            if let Some(a) = ai.as_deref_mut() {
                // Images hold at most MAX_FEATURES values: fits in u32.
                a[o] = best as u32;
            }
        }
    };
    let images = xs
        .par_chunks_exact(in_len)
        .zip(y.par_chunks_exact_mut(out_len));
    if arg.is_empty() {
        images.for_each(|(xi, yi)| pool(xi, yi, None));
    } else {
        images
            .zip(arg.par_chunks_exact_mut(out_len))
            .for_each(|((xi, yi), ai)| pool(xi, yi, Some(ai)));
    }
    let out: Mat = dev.tensor_from_vec(y, (n, out_len));
    if T::OWNS_TAPE {
        let (x_id, o_id) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            // Nothing reads the output's gradient after this operation.
            let gy = std::mem::take(&mut **grads.get_or_alloc_mut(&o_id)?);
            let gx = grads.get_or_alloc_mut(&x_id)?;
            gx.par_chunks_exact_mut(in_len)
                .zip(
                    gy.par_chunks_exact(out_len)
                        .zip(arg.par_chunks_exact(out_len)),
                )
                .for_each(|(gxi, (gyi, ai))| {
                    for (&a, g) in ai.iter().zip(gyi) {
                        gxi[a as usize] += g;
                    }
                });
            Ok(())
        });
    }
    out.put_tape(tape)
}

/// The mean of each window; the backward pass shares each output's
/// gradient equally among its window.
pub(crate) fn avg_pool2d<T: Tape<f32, Cpu>>(g: &PoolGeom, x: Mat<T>) -> Mat<T> {
    let (x, mut tape) = x.split_tape();
    let dev = x.device().clone();
    let n = x.shape().0;
    let xs = values(&x);
    let (in_len, out_len) = (g.in_len(), g.out_len());
    let area = (g.k * g.k) as f32;
    let mut y = vec![0.0f32; n * out_len];
    let corners = g.corners();
    for img in 0..n {
        let xi = &xs[img * in_len..][..in_len];
        for (o, &corner) in corners.iter().enumerate() {
            let mut sum = 0.0f32;
            for ki in 0..g.k {
                for v in &xi[corner + ki * g.w..][..g.k] {
                    sum += v;
                }
            }
            y[img * out_len + o] = sum / area;
        }
    }
    let out: Mat = dev.tensor_from_vec(y, (n, out_len));
    if T::OWNS_TAPE {
        let geom = *g;
        let (x_id, o_id) = (x.ghost(), out.ghost());
        tape.add_backward_op(move |grads| {
            // Nothing reads the output's gradient after this operation.
            let gy = std::mem::take(&mut **grads.get_or_alloc_mut(&o_id)?);
            let gx = grads.get_or_alloc_mut(&x_id)?;
            for img in 0..n {
                let gxi = &mut gx[img * in_len..][..in_len];
                for (o, &corner) in corners.iter().enumerate() {
                    let share = gy[img * out_len + o] / area;
                    for ki in 0..geom.k {
                        for v in &mut gxi[corner + ki * geom.w..][..geom.k] {
                            *v += share;
                        }
                    }
                }
            }
            Ok(())
        });
    }
    out.put_tape(tape)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Output, input gradient, weight gradient and bias gradient of one
    /// traced convolution of `x` with output gradient `gy`.
    fn run(g: &ConvGeom, x: &[f32], w: &[f32], b: &[f32], gy: &[f32]) -> [Vec<f32>; 4] {
        let dev = Cpu::default();
        let n = x.len() / g.in_len();
        let x: Mat = dev.tensor_from_vec(x.to_vec(), (n, g.in_len()));
        let w: Mat = dev.tensor_from_vec(w.to_vec(), (g.oc, g.row()));
        let b: Vector = dev.tensor_from_vec(b.to_vec(), (g.oc,));
        let skip = Arc::new(AtomicBool::new(false));
        let y = conv2d(g, x.trace(Gradients::leaky()), &w, Some(&b), &skip);
        let out = values(&y.retaped::<NoneTape>());
        let gy: Mat = dev.tensor_from_vec(gy.to_vec(), (n, g.oc * g.positions()));
        let grads = crate::stage::backprop(y, gy);
        [
            out,
            values(&grads.get(&x)),
            values(&grads.get(&w)),
            grads.get(&b).as_vec(),
        ]
    }

    fn ramp(len: usize, mul: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * mul % 97) as f32 / 97.0 - 0.5) * 0.5)
            .collect()
    }

    /// A batch that spans several blocks: each image's output and input
    /// gradient are those of the image alone, the parameter gradients are
    /// the sums over images, and one thread gives the same bits as two.
    #[test]
    fn blocks_split_the_batch_without_changing_the_result() {
        let g = ConvGeom {
            c: 2,
            h: 40,
            w: 40,
            oc: 3,
            k: 5,
            s: 1,
            p: 2,
            oh: 40,
            ow: 40,
        };
        assert_eq!(g.block_images(), 3);
        let n = 7;
        let x = ramp(n * g.in_len(), 31);
        let w = ramp(g.oc * g.row(), 17);
        let b = ramp(g.oc, 5);
        let gy = ramp(n * g.oc * g.positions(), 13);
        let whole = run(&g, &x, &w, &b, &gy);

        let out_len = g.oc * g.positions();
        let mut gw_sum = vec![0.0f32; w.len()];
        let mut gb_sum = vec![0.0f32; b.len()];
        for i in 0..n {
            let one = run(
                &g,
                &x[i * g.in_len()..][..g.in_len()],
                &w,
                &b,
                &gy[i * out_len..][..out_len],
            );
            assert_eq!(
                one[0],
                whole[0][i * out_len..][..out_len],
                "output of image {i}"
            );
            assert_eq!(
                one[1],
                whole[1][i * g.in_len()..][..g.in_len()],
                "input gradient of image {i}"
            );
            gw_sum.iter_mut().zip(&one[2]).for_each(|(s, v)| *s += v);
            gb_sum.iter_mut().zip(&one[3]).for_each(|(s, v)| *s += v);
        }
        let close = |a: &[f32], b: &[f32], what: &str| {
            for (i, (a, b)) in a.iter().zip(b).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{what}[{i}]: {a} vs {b}"
                );
            }
        };
        close(&whole[2], &gw_sum, "weight gradient");
        close(&whole[3], &gb_sum, "bias gradient");

        let single = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .expect("pool")
            .install(|| run(&g, &x, &w, &b, &gy));
        assert_eq!(single, whole, "one thread and the default pool differ");
    }
}
