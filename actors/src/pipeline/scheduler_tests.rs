//! Tests of the scheduler's window, eviction and routing (a child module of scheduler.rs).

use super::*;

/// Each unit's position in a use order that is the index order (no split experts).
fn index_order(bytes: &[u64]) -> Vec<usize> {
    (0..bytes.len()).collect()
}

#[test]
fn everything_fits() {
    let p = plan_fixed(&[10, 10, 10, 5], 3, &BTreeSet::new(), 100, 2).unwrap();
    assert_eq!(p.fixed, vec![true; 4]);
    assert_eq!(p.window, 0);
}

#[test]
fn prefix_resident_rest_streamed() {
    // 6 layers of 10 B + global 5 B, budget 45: window 2 (20 B), 2 leading layers fixed.
    let bytes = [10, 10, 10, 10, 10, 10, 5];
    let p = plan_fixed(&bytes, 6, &BTreeSet::new(), 45, 2).unwrap();
    assert_eq!(p.window, 2);
    assert_eq!(p.fixed, vec![true, true, false, false, false, false, true]);
}

#[test]
fn too_small_and_pins() {
    let bytes = [10, 10, 10, 5];
    assert!(matches!(
        plan_fixed(&bytes, 3, &BTreeSet::new(), 14, 1),
        Err(RuntimeError::BudgetTooSmall { .. })
    ));
    let pins: BTreeSet<usize> = [2].into();
    let p = plan_fixed(&bytes, 3, &pins, 25, 1).unwrap();
    assert_eq!(p.fixed, vec![false, false, true, true]);
    let pins: BTreeSet<usize> = [0, 1].into();
    assert!(plan_fixed(&bytes, 3, &pins, 30, 1).is_err());
}

#[test]
fn prefetch_room_demotes_the_fixed_layer_used_last() {
    // 6 layers of 10 B + global 5 B, budget 45, window 2: layers 0 and 1 fixed.
    let bytes = [10, 10, 10, 10, 10, 10, 5];
    let none = BTreeSet::new();
    let base = plan_fixed(&bytes, 6, &none, 45, 2).unwrap();
    let pre: BTreeSet<usize> = [5].into();
    // Idle (cursor on the global unit): layer 0 comes next, layer 1 last.
    let mut p = base.clone();
    assert_eq!(
        make_room(
            &mut p,
            &bytes,
            6,
            &none,
            &pre,
            45,
            (6, &index_order(&bytes))
        )
        .unwrap(),
        vec![1]
    );
    assert_eq!(p.fixed, vec![true, false, false, false, false, false, true]);
    assert!(p.reserved(&bytes) + bytes[5] <= 45);
    // About to run layer 1: layer 0 is the one used last.
    let mut p = base.clone();
    assert_eq!(
        make_room(
            &mut p,
            &bytes,
            6,
            &none,
            &pre,
            45,
            (1, &index_order(&bytes))
        )
        .unwrap(),
        vec![0]
    );
    // Pins are never demoted.
    let pins: BTreeSet<usize> = [1].into();
    let mut p = plan_fixed(&bytes, 6, &pins, 45, 2).unwrap();
    assert_eq!(
        make_room(
            &mut p,
            &bytes,
            6,
            &pins,
            &pre,
            45,
            (6, &index_order(&bytes))
        )
        .unwrap(),
        vec![0]
    );
    assert!(p.fixed[1]);
    // A prefetched unit that is fixed anyway needs no room.
    let mut p = base.clone();
    let fixed: BTreeSet<usize> = [0].into();
    assert!(make_room(
        &mut p,
        &bytes,
        6,
        &none,
        &fixed,
        45,
        (6, &index_order(&bytes))
    )
    .unwrap()
    .is_empty());
    assert_eq!(p, base);
}

#[test]
fn prefetch_that_cannot_fit_leaves_the_plan_unchanged() {
    let bytes = [10, 10, 10, 10, 10, 10, 5];
    let none = BTreeSet::new();
    let base = plan_fixed(&bytes, 6, &none, 45, 2).unwrap();
    // Global 5 + window 20 + three prefetched layers 30 > 45 even with nothing fixed.
    let pre: BTreeSet<usize> = [2, 3, 4].into();
    let mut p = base.clone();
    assert!(matches!(
        make_room(
            &mut p,
            &bytes,
            6,
            &none,
            &pre,
            45,
            (6, &index_order(&bytes))
        ),
        Err(RuntimeError::HintRejected(_))
    ));
    assert_eq!(p, base);
    // Everything fixed: no window to stream a demoted layer through.
    let mut all = plan_fixed(&bytes, 6, &none, 100, 2).unwrap();
    assert!(make_room(
        &mut all,
        &bytes,
        6,
        &none,
        &pre,
        45,
        (6, &index_order(&bytes))
    )
    .is_err());
}
