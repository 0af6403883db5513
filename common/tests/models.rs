//! Model construction, naming, state and masks.
#![allow(clippy::unwrap_used)]

use fedtiny_common::cost::{self, Storage};
use fedtiny_common::layers::Slot;
use fedtiny_common::mask::{Mask, MaskSet};
use fedtiny_common::models::{Arch, Model, ModelSpec};
use fedtiny_common::param::Role;
use fedtiny_common::tensor::{Mode, from_vec};

fn spec(arch: Arch, input: [usize; 3], width: f64) -> ModelSpec {
    ModelSpec::new(arch, input, 10, width).unwrap()
}

#[test]
fn every_model_runs_on_both_input_shapes() {
    for arch in [Arch::Cnn, Arch::Vgg11, Arch::Resnet18] {
        for input in [[28, 28, 1], [32, 32, 3]] {
            let mut m = Model::new(&spec(arch, input, 0.25), 1).unwrap();
            let [h, w, c] = input;
            let x = from_vec(&[2, h, w, c], vec![0.5; 2 * h * w * c]).unwrap();
            let y = m.forward(x, Mode::Eval).unwrap();
            assert_eq!(y.shape(), &[2, 10], "{arch} {input:?}");
        }
    }
}

#[test]
fn cnn_has_the_specified_layers_and_parameter_count() {
    let m = Model::new(&spec(Arch::Cnn, [28, 28, 1], 1.0), 1).unwrap();
    // conv 3·3·1·32 + bn 2·32 + conv 3·3·32·64 + bn 2·64 + fc 3136·128+128 + fc 128·10+10
    let expected = 288 + 64 + 18432 + 128 + 3136 * 128 + 128 + 1280 + 10;
    assert_eq!(m.num_params(), expected);
    assert_eq!(
        m.prunable_names(),
        vec!["conv2.weight", "fc1.weight", "fc2.weight"]
    );
}

#[test]
fn resnet18_names_roles_and_zero_initialised_last_bn() {
    let m = Model::new(&spec(Arch::Resnet18, [32, 32, 3], 1.0), 1).unwrap();
    // The reference CIFAR ResNet-18 has 11,173,962 parameters (with a 10-class head).
    assert_eq!(m.num_params(), 11_173_962);
    let names = m.prunable_names();
    assert!(
        !names.contains(&"conv1.weight".to_string()),
        "the stem is not prunable"
    );
    assert!(names.contains(&"layer2.0.shortcut.conv.weight".to_string()));
    assert!(names.contains(&"fc.weight".to_string()));
    assert_eq!(names.len(), 20, "16 block convs + 3 shortcuts + fc");
    let sd = m.state_dict();
    let g = sd.get("layer3.1.bn2.weight").unwrap();
    assert_eq!(g.role, Role::BnScale);
    assert!(g.values.iter().all(|v| *v == 0.0));
    assert!(
        sd.get("layer3.1.bn1.weight")
            .unwrap()
            .values
            .iter()
            .all(|v| *v == 1.0)
    );
    assert_eq!(sd.get("bn1.running_var").unwrap().role, Role::RunningVar);
}

#[test]
fn vgg11_skips_pools_that_have_nothing_to_pool() {
    let m28 = Model::new(&spec(Arch::Vgg11, [28, 28, 1], 0.25), 1).unwrap();
    let m32 = Model::new(&spec(Arch::Vgg11, [32, 32, 3], 0.25), 1).unwrap();
    let pools = |m: &Model| {
        m.trace()
            .unwrap()
            .iter()
            .filter(|o| o.kind == fedtiny_common::layers::OpKind::MaxPool)
            .count()
    };
    assert_eq!(pools(&m28), 4);
    assert_eq!(pools(&m32), 5);
    assert_eq!(
        m28.prunable_names().len(),
        8,
        "7 convs after the stem + classifier"
    );
}

#[test]
fn state_dict_round_trips_and_bad_states_are_refused_without_change() {
    let s = spec(Arch::Cnn, [28, 28, 1], 0.5);
    let a = Model::new(&s, 1).unwrap();
    let mut b = Model::new(&s, 2).unwrap();
    assert_ne!(a.state_dict(), b.state_dict());
    b.load_state_dict(&a.state_dict()).unwrap();
    assert_eq!(a.state_dict(), b.state_dict());

    let before = b.state_dict();
    let mut missing = a.state_dict();
    missing.entries.remove("fc1.bias");
    assert!(b.load_state_dict(&missing).is_err());
    let mut nan = a.state_dict();
    nan.entries.get_mut("fc1.weight").unwrap().values[3] = f32::NAN;
    assert!(b.load_state_dict(&nan).is_err());
    let mut shape = a.state_dict();
    shape.entries.get_mut("fc2.bias").unwrap().shape = vec![11];
    assert!(b.load_state_dict(&shape).is_err());
    let mut extra = a.state_dict();
    let e = extra.entries["fc2.bias"].clone();
    extra.entries.insert("fc3.bias".into(), e);
    assert!(b.load_state_dict(&extra).is_err());
    assert_eq!(b.state_dict(), before, "a refused state changes nothing");
}

#[test]
fn masks_zero_weights_and_density_is_accounted() {
    let mut m = Model::new(&spec(Arch::Cnn, [28, 28, 1], 1.0), 1).unwrap();
    assert_eq!(m.density(), 1.0);
    let mut set = MaskSet::default();
    m.visit(&mut |name, slot| {
        if let Slot::Param(p) = slot
            && p.prunable
        {
            set.masks
                .insert(name.to_string(), Mask::from_fn(p.len(), |i| i % 10 == 0));
        }
    });
    m.set_masks(&set).unwrap();
    let (a, t) = m.prunable_counts();
    assert_eq!(t, 18432 + 3136 * 128 + 1280);
    assert_eq!(a, set.counts().0);
    assert!((m.density() - 0.1).abs() < 0.001);
    let sd = m.state_dict();
    let w = &sd.get("fc1.weight").unwrap().values;
    assert!(w.iter().enumerate().all(|(i, v)| i % 10 == 0 || *v == 0.0));
    assert_eq!(m.masks(), set);

    // A mask on the stem, or of the wrong length, is refused.
    let mut bad = MaskSet::default();
    bad.masks.insert("conv1.weight".into(), Mask::ones(288));
    assert!(m.set_masks(&bad).is_err());
    let mut bad = MaskSet::default();
    bad.masks.insert("fc2.weight".into(), Mask::ones(7));
    assert!(m.set_masks(&bad).is_err());
}

#[test]
fn flops_and_memory_fall_with_density() {
    let mut m = Model::new(&spec(Arch::Cnn, [28, 28, 1], 1.0), 1).unwrap();
    let dense = cost::flops(&m).unwrap();
    // Forward multiply-adds per sample, by hand: conv1 28·28·9·32, conv2 14·14·288·64,
    // fc1 3136·128, fc2 128·10.
    let macs = 28 * 28 * 9 * 32 + 14 * 14 * 288 * 64 + 3136 * 128 + 1280;
    assert_eq!(dense.forward_dense, 2.0 * macs as f64);
    assert_eq!(dense.forward_sparse, dense.forward_dense);
    let mut set = MaskSet::default();
    for name in m.prunable_names() {
        let n = m.state_dict().get(&name).unwrap().values.len();
        set.masks.insert(name, Mask::from_fn(n, |i| i % 100 == 0));
    }
    m.set_masks(&set).unwrap();
    let sparse = cost::flops(&m).unwrap();
    let stem = 2.0 * (28 * 28 * 9 * 32) as f64;
    let expected = stem + (sparse.forward_dense - stem) * 0.01;
    assert!((sparse.forward_sparse - expected).abs() / expected < 0.01);
    assert_eq!(
        sparse.train_sparse_with_dense_grad(),
        2.0 * sparse.forward_sparse + sparse.forward_dense
    );

    let dm = cost::memory(&m, 64, 3, Storage::Dense).unwrap();
    let sm = cost::memory(&m, 64, 3, Storage::Sparse).unwrap();
    assert!(sm.model_state() * 10 < dm.model_state(), "{sm:?} vs {dm:?}");
    assert_eq!(sm.activations, dm.activations);
    assert!(cost::peak_rss_bytes().is_some_and(|b| b > 0));
}
