//! Gradient checkpointing (`orpo::model::recompute`) matches plain autograd exactly enough.

use candle_core::{DType, Device, Result, Tensor, Var, D};
use orpo::model::recompute::{checkpoint, Block, SideGrads};
use std::sync::Arc;

/// `x + softmax(relu(x W1 + b1)) W2 + b2`, with the softmax spelled out in primitive ops.
struct Mlp {
    w1: Var,
    b1: Var,
    w2: Var,
    b2: Var,
}

impl Mlp {
    fn new(e: usize, h: usize, dtype: DType, dev: &Device) -> Result<Self> {
        let v = |shape: &[usize]| {
            Var::from_tensor(&Tensor::randn(0f32, 0.5, shape, dev)?.to_dtype(dtype)?)
        };
        Ok(Self {
            w1: v(&[e, h])?,
            b1: v(&[h])?,
            w2: v(&[h, e])?,
            b2: v(&[e])?,
        })
    }
}

impl Block for Mlp {
    fn forward(&self, x: &Tensor, live: bool) -> Result<Tensor> {
        let p = |v: &Var| {
            if live {
                v.as_tensor().clone()
            } else {
                v.as_tensor().detach()
            }
        };
        let h = x
            .broadcast_matmul(&p(&self.w1))?
            .broadcast_add(&p(&self.b1))?
            .relu()?;
        let m = h.max_keepdim(D::Minus1)?.detach();
        let e = h.broadcast_sub(&m)?.exp()?;
        let s = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
        let o = s
            .broadcast_matmul(&p(&self.w2))?
            .broadcast_add(&p(&self.b2))?;
        x + o
    }

    fn vars(&self) -> Vec<Var> {
        vec![
            self.w1.clone(),
            self.b1.clone(),
            self.w2.clone(),
            self.b2.clone(),
        ]
    }
}

struct Net {
    emb: Var,
    blocks: Vec<Arc<Mlp>>,
    ids: Tensor,
}

impl Net {
    fn new(layers: usize, dtype: DType) -> Result<Self> {
        let dev = Device::Cpu;
        let (vocab, e, h) = (11, 8, 16);
        let emb = Var::from_tensor(&Tensor::randn(0f32, 1.0, (vocab, e), &dev)?.to_dtype(dtype)?)?;
        let blocks = (0..layers)
            .map(|_| Mlp::new(e, h, dtype, &dev).map(Arc::new))
            .collect::<Result<_>>()?;
        let ids = Tensor::new(&[[1u32, 4, 7, 2, 9], [3, 3, 0, 10, 5]], &dev)?;
        Ok(Self { emb, blocks, ids })
    }

    fn input(&self) -> Result<Tensor> {
        let (n, l) = self.ids.dims2()?;
        self.emb
            .embedding(&self.ids.flatten_all()?)?
            .reshape((n, l, ()))
    }

    fn all_vars(&self) -> Vec<Var> {
        let mut v = vec![self.emb.clone()];
        v.extend(self.blocks.iter().flat_map(|b| b.vars()));
        v
    }

    /// Runs the stack from `x`, checkpointed or plain.
    fn run(&self, x: Tensor, side: Option<&SideGrads>) -> Result<Tensor> {
        self.blocks.iter().try_fold(x, |x, b| match side {
            Some(side) => checkpoint(&x, b.clone(), side),
            None => b.forward(&x, true),
        })
    }

    /// A loss that also uses a block parameter outside the blocks, so merging must add.
    fn loss(&self, y: &Tensor) -> Result<Tensor> {
        let w = Tensor::arange(0f32, y.elem_count() as f32, y.device())?
            .to_dtype(y.dtype())?
            .reshape(y.shape())?
            .affine(0.01, -0.2)?;
        let tied = self.blocks[0].w1.as_tensor().sqr()?.sum_all()?;
        (y.sqr()? * w)?.sum_all()? + tied
    }
}

fn to_vec(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn assert_close(a: &Tensor, b: &Tensor, rel: f64, what: &str) {
    let (a, b) = (to_vec(a), to_vec(b));
    assert_eq!(a.len(), b.len(), "{what}: length");
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-12);
    let diff = a
        .iter()
        .zip(&b)
        .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff / scale <= rel,
        "{what}: max diff {diff} vs scale {scale}"
    );
}

/// Gradients of every var, plain vs checkpointed, from input `x` made by `input`.
fn compare_grads(net: &Net, input: impl Fn() -> Result<Tensor>, vars: &[Var]) -> Result<()> {
    let plain = net.loss(&net.run(input()?, None)?)?.backward()?;

    let side = SideGrads::default();
    let mut ckpt = net.loss(&net.run(input()?, Some(&side))?)?.backward()?;
    assert!(!side.is_empty());
    side.merge_into(&mut ckpt)?;
    assert!(side.is_empty(), "merge_into clears the side store");

    for (i, v) in vars.iter().enumerate() {
        let p = plain.get(v).expect("plain grad");
        let c = ckpt
            .get(v)
            .unwrap_or_else(|| panic!("checkpointed grad of var {i}"));
        assert_close(c, p, 1e-6, &format!("var {i}"));
    }
    Ok(())
}

#[test]
fn stacked_checkpoints_match_plain_gradients() -> Result<()> {
    for layers in [2, 3] {
        let net = Net::new(layers, DType::F32)?;
        compare_grads(&net, || net.input(), &net.all_vars())?;
    }
    Ok(())
}

#[test]
fn constant_input_still_gets_parameter_gradients() -> Result<()> {
    let net = Net::new(2, DType::F32)?;
    let x = net.input()?.detach();
    assert!(!x.track_op());
    let vars: Vec<Var> = net.blocks.iter().flat_map(|b| b.vars()).collect();
    compare_grads(&net, || Ok(x.clone()), &vars)?;

    // A single block on a constant input: the anchor alone keeps the node in the graph.
    let side = SideGrads::default();
    let y = checkpoint(&x, net.blocks[1].clone(), &side)?;
    let mut g = y.sum_all()?.backward()?;
    side.merge_into(&mut g)?;
    for v in net.blocks[1].vars() {
        assert!(g.get(&v).is_some());
    }
    Ok(())
}

#[test]
fn forward_value_is_exact_and_graph_is_shallow() -> Result<()> {
    for dtype in [DType::F32, DType::F64] {
        let net = Net::new(3, dtype)?;
        let plain = net.run(net.input()?, None)?;
        let ckpt = net.run(net.input()?, Some(&SideGrads::default()))?;
        assert_eq!(ckpt.dtype(), dtype);
        assert_eq!(ckpt.dims(), plain.dims());
        assert_eq!(to_vec(&ckpt), to_vec(&plain));
        // The input's nodes plus one node per block: no block internals are kept.
        let input_nodes = net.input()?.sorted_nodes().len();
        let plain_nodes = plain.sorted_nodes().len();
        let ckpt_nodes = ckpt.sorted_nodes().len();
        assert_eq!(ckpt_nodes, input_nodes + net.blocks.len());
        assert!(plain_nodes > ckpt_nodes + 10 * net.blocks.len());
    }
    Ok(())
}

#[test]
fn non_contiguous_input_and_output() -> Result<()> {
    // A transposed (strided) x and a block returning a strided view.
    struct T;
    impl Block for T {
        fn forward(&self, x: &Tensor, _: bool) -> Result<Tensor> {
            (x * 2.0)?.t()
        }
        fn vars(&self) -> Vec<Var> {
            vec![]
        }
    }
    let v = Var::from_tensor(&Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((2, 3))?)?;
    let x = v.as_tensor().t()?;
    let y = checkpoint(&x, Arc::new(T), &SideGrads::default())?;
    assert_eq!(to_vec(&y), to_vec(&(v.as_tensor() * 2.0)?));
    let g = (y * Tensor::new(&[[1f32, 2., 3.], [4., 5., 6.]], &Device::Cpu)?)?
        .sum_all()?
        .backward()?;
    assert_eq!(to_vec(g.get(&v).unwrap()), vec![2., 4., 6., 8., 10., 12.]);
    Ok(())
}

/// The seeded backward the checkpoint uses (`backward_with_grad`, the vendored candle's) gives
/// every variable the bits `(y * g).sum_all().backward()` gives, through bf16 casts, broadcasts,
/// products and a softmax; a seed of the wrong shape or dtype is an error.
#[test]
fn seeded_backward_matches_the_sum_of_products_bit_for_bit() -> Result<()> {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::randn(0f32, 0.5, (6, 5), &dev)?)?;
    let b = Var::from_tensor(&Tensor::randn(0f32, 0.5, 5, &dev)?)?;
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 4, 6), &dev)?)?;
    let y = x
        .as_tensor()
        .to_dtype(DType::BF16)?
        .broadcast_matmul(&w.as_tensor().to_dtype(DType::BF16)?)?
        .to_dtype(DType::F32)?
        .broadcast_add(b.as_tensor())?;
    let y = candle_nn::ops::softmax(&(y * 1.7)?, D::Minus1)?.to_dtype(DType::BF16)?;
    let g = Tensor::randn(0f32, 1.0, y.shape(), &dev)?.to_dtype(DType::BF16)?;
    let seeded = y.backward_with_grad(&g)?;
    let summed = (&y * &g)?.sum_all()?.backward()?;
    for (v, name) in [(&w, "w"), (&b, "b"), (&x, "x")] {
        let bits = |s: &candle_core::backprop::GradStore| -> Result<Vec<u32>> {
            let t = s.get(v.as_tensor()).expect(name).flatten_all()?;
            Ok(t.to_vec1::<f32>()?.iter().map(|f| f.to_bits()).collect())
        };
        assert_eq!(bits(&seeded)?, bits(&summed)?, "{name}'s gradient");
    }
    assert!(y.backward_with_grad(&g.narrow(0, 0, 2)?).is_err());
    assert!(y.backward_with_grad(&g.to_dtype(DType::F32)?).is_err());
    Ok(())
}
