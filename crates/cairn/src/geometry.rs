//! Box geometry of tensor pieces: intersecting boxes and copying the intersection of two
//! row-major boxes of one global tensor. Pure functions over shapes, used to assemble
//! whole tensors from pieces and to cut the boxes a rank asks for (resharding).

/// A box of a tensor: offsets within its global shape and the box's own shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorBox {
    /// Offset of the box, one per dimension.
    pub offsets: Vec<u64>,
    /// Shape of the box.
    pub shape: Vec<u64>,
}

/// Whether two boxes (offsets, shape) of the same rank intersect.
pub fn boxes_overlap(a_off: &[u64], a_shape: &[u64], b_off: &[u64], b_shape: &[u64]) -> bool {
    a_off
        .iter()
        .zip(a_shape)
        .zip(b_off.iter().zip(b_shape))
        .all(|((&ao, &al), (&bo, &bl))| ao < bo + bl && bo < ao + al)
}

/// Whether any two of `boxes` (each `(offsets, shape)`, all of one rank) overlap, in
/// O(B log B + C) time where C is the number of pairs whose extents meet along the
/// dimension with the most distinct offsets (1 per box for row, column and most grid
/// layouts). `Err(())` when C would exceed `max_comparisons`: the caller treats such a
/// layout as too entangled to check.
#[allow(clippy::result_unit_err)]
pub fn any_overlap(boxes: &[(&[u64], &[u64])], max_comparisons: u64) -> Result<bool, ()> {
    let rank = boxes.first().map_or(0, |(off, _)| off.len());
    if rank == 0 {
        return Ok(boxes.len() > 1);
    }
    let distinct = |d: usize| {
        let mut starts: Vec<u64> = boxes.iter().map(|(off, _)| off[d]).collect();
        starts.sort_unstable();
        starts.dedup();
        starts.len()
    };
    let dim = (0..rank).max_by_key(|&d| distinct(d)).unwrap_or(0);
    let mut order: Vec<usize> = (0..boxes.len()).collect();
    order.sort_unstable_by_key(|&i| boxes[i].0[dim]);
    let mut active: Vec<usize> = Vec::new();
    let mut budget = max_comparisons;
    for i in order {
        let (off, shape) = boxes[i];
        if shape.contains(&0) {
            continue;
        }
        active.retain(|&j| boxes[j].0[dim].saturating_add(boxes[j].1[dim]) > off[dim]);
        budget = budget.checked_sub(active.len() as u64).ok_or(())?;
        if active.iter().any(|&j| boxes_overlap(off, shape, boxes[j].0, boxes[j].1)) {
            return Ok(true);
        }
        active.push(i);
    }
    Ok(false)
}

/// The intersection of two boxes as (offsets, shape), or `None` if empty. A 0-d box
/// (rank 0) intersects a 0-d box.
pub fn intersection(a_off: &[u64], a_shape: &[u64], b_off: &[u64], b_shape: &[u64]) -> Option<(Vec<u64>, Vec<u64>)> {
    let mut off = Vec::with_capacity(a_off.len());
    let mut shape = Vec::with_capacity(a_off.len());
    for d in 0..a_off.len() {
        let lo = a_off[d].max(b_off[d]);
        let hi = (a_off[d] + a_shape[d]).min(b_off[d] + b_shape[d]);
        if hi <= lo {
            return None;
        }
        off.push(lo);
        shape.push(hi - lo);
    }
    Some((off, shape))
}

fn strides(shape: &[u64]) -> Vec<u64> {
    let mut strides = vec![1u64; shape.len()];
    for d in (0..shape.len().saturating_sub(1)).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    strides
}

/// Copies the intersection of the box `src` (row-major bytes of the box at `src_off` with
/// `src_shape`) into the box `dst` (at `dst_off` with `dst_shape`). Elements are `elem`
/// bytes. The caller has checked that both buffers match their boxes' sizes.
pub fn copy_intersection(
    dst: &mut [u8],
    dst_off: &[u64],
    dst_shape: &[u64],
    src: &[u8],
    src_off: &[u64],
    src_shape: &[u64],
    elem: usize,
) {
    let rank = dst_shape.len();
    if rank == 0 {
        dst[..elem].copy_from_slice(&src[..elem]);
        return;
    }
    let Some((off, shape)) = intersection(dst_off, dst_shape, src_off, src_shape) else { return };
    let (ds, ss) = (strides(dst_shape), strides(src_shape));
    let row = shape[rank - 1] as usize * elem;
    let rows: u64 = shape[..rank - 1].iter().product();
    let mut index = vec![0u64; rank - 1];
    for _ in 0..rows {
        let (mut d_at, mut s_at) = (off[rank - 1] - dst_off[rank - 1], off[rank - 1] - src_off[rank - 1]);
        for d in 0..rank - 1 {
            let g = off[d] + index[d];
            d_at += (g - dst_off[d]) * ds[d];
            s_at += (g - src_off[d]) * ss[d];
        }
        let (d_at, s_at) = (d_at as usize * elem, s_at as usize * elem);
        dst[d_at..d_at + row].copy_from_slice(&src[s_at..s_at + row]);
        for d in (0..rank - 1).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairwise_overlap(boxes: &[(&[u64], &[u64])]) -> bool {
        (0..boxes.len()).any(|i| {
            (i + 1..boxes.len()).any(|j| {
                !boxes[i].1.contains(&0)
                    && !boxes[j].1.contains(&0)
                    && boxes_overlap(boxes[i].0, boxes[i].1, boxes[j].0, boxes[j].1)
            })
        })
    }

    proptest::proptest! {
        #[test]
        fn sweep_agrees_with_every_pair(raw in proptest::collection::vec((0u64..6, 0u64..4, 0u64..6, 0u64..4), 0..12)) {
            let boxes: Vec<([u64; 2], [u64; 2])> = raw.iter().map(|&(a, b, c, d)| ([a, c], [b, d])).collect();
            let views: Vec<(&[u64], &[u64])> = boxes.iter().map(|(o, s)| (&o[..], &s[..])).collect();
            proptest::prop_assert_eq!(any_overlap(&views, u64::MAX), Ok(pairwise_overlap(&views)));
        }
    }

    #[test]
    fn a_layout_past_the_comparison_budget_is_refused_not_checked_slowly() {
        // A 50 x 50 grid: sweeping either dimension meets the 50 boxes of a row.
        let boxes: Vec<([u64; 2], [u64; 2])> = (0..2500).map(|i| ([i / 50, i % 50], [1, 1])).collect();
        let views: Vec<(&[u64], &[u64])> = boxes.iter().map(|(o, s)| (&o[..], &s[..])).collect();
        assert_eq!(any_overlap(&views, 10 * 2500), Err(()));
        assert_eq!(any_overlap(&views, 50 * 2500), Ok(false));
    }

    #[test]
    fn a_hundred_thousand_columns_are_checked_without_comparing_every_pair() {
        let boxes: Vec<([u64; 2], [u64; 2])> = (0..100_000).map(|i| ([0, i], [8, 1])).collect();
        let views: Vec<(&[u64], &[u64])> = boxes.iter().map(|(o, s)| (&o[..], &s[..])).collect();
        assert_eq!(any_overlap(&views, 1_000_000), Ok(false));
        let stacked: Vec<(&[u64], &[u64])> = views.iter().map(|(_, s)| (&[0u64, 0][..], *s)).collect();
        assert_eq!(any_overlap(&stacked, 1_000_000), Ok(true));
    }
    use proptest::prelude::*;

    #[test]
    fn two_column_halves_rebuild_a_matrix() {
        // 2x4 matrix of u8 = [[0,1,2,3],[4,5,6,7]], saved as two 2x2 column halves.
        let left = [0u8, 1, 4, 5];
        let right = [2u8, 3, 6, 7];
        let mut dst = vec![0u8; 8];
        copy_intersection(&mut dst, &[0, 0], &[2, 4], &left, &[0, 0], &[2, 2], 1);
        copy_intersection(&mut dst, &[0, 0], &[2, 4], &right, &[0, 2], &[2, 2], 1);
        assert_eq!(dst, (0u8..8).collect::<Vec<_>>());
    }

    #[test]
    fn overlap_is_detected_per_dimension() {
        assert!(boxes_overlap(&[0, 0], &[2, 2], &[1, 1], &[2, 2]));
        assert!(!boxes_overlap(&[0, 0], &[2, 2], &[0, 2], &[2, 2]));
    }

    fn element(shape: &[u64], at: &[u64]) -> u8 {
        let mut linear = 0u64;
        for (d, &i) in at.iter().enumerate() {
            linear = linear * shape[d] + i;
        }
        (linear % 251) as u8
    }

    fn fill(global: &[u64], off: &[u64], shape: &[u64]) -> Vec<u8> {
        let n: u64 = shape.iter().product();
        (0..n)
            .map(|mut linear| {
                let mut at = vec![0u64; shape.len()];
                for d in (0..shape.len()).rev() {
                    at[d] = off[d] + linear % shape[d];
                    linear /= shape[d];
                }
                element(global, &at)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn any_box_cut_from_any_tiling_matches_the_global_tensor(
            global in prop::collection::vec(1u64..6, 1..4),
            cuts in prop::collection::vec(0u64..6, 1..4),
            want in prop::collection::vec((0u64..6, 1u64..6), 1..4),
        ) {
            let rank = global.len();
            // Split dimension 0 at `cuts` into pieces.
            let mut bounds: Vec<u64> = cuts.iter().map(|c| c % global[0]).chain([0, global[0]]).collect();
            bounds.sort_unstable();
            bounds.dedup();
            let (w_off, w_shape): (Vec<u64>, Vec<u64>) = (0..rank)
                .map(|d| {
                    let (o, l) = want.get(d).copied().unwrap_or((0, global[d]));
                    let o = o % global[d];
                    (o, l.min(global[d] - o).max(1))
                })
                .unzip();
            let mut got = vec![0u8; w_shape.iter().product::<u64>() as usize];
            for pair in bounds.windows(2) {
                let mut off = vec![0u64; rank];
                let mut shape = global.clone();
                off[0] = pair[0];
                shape[0] = pair[1] - pair[0];
                let src = fill(&global, &off, &shape);
                copy_intersection(&mut got, &w_off, &w_shape, &src, &off, &shape, 1);
            }
            prop_assert_eq!(got, fill(&global, &w_off, &w_shape));
        }
    }
}
