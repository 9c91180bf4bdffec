//! Box geometry of tensor pieces: copying a dense box into its place in a row-major
//! global tensor, and checking that boxes tile a shape. Pure functions over shapes.

/// Whether two boxes (offsets, shape) intersect.
pub fn boxes_overlap(a_off: &[u64], a_shape: &[u64], b_off: &[u64], b_shape: &[u64]) -> bool {
    a_off
        .iter()
        .zip(a_shape)
        .zip(b_off.iter().zip(b_shape))
        .all(|((&ao, &al), (&bo, &bl))| ao < bo + bl && bo < ao + al)
}

/// Copies the dense row-major box `src` (at `offsets`, of `box_shape`) into `dst`, the
/// row-major buffer of a tensor of `shape`. Elements are `elem` bytes. The caller has
/// checked that the box lies inside `shape` and that the buffers have the right lengths.
pub fn copy_box_into(dst: &mut [u8], shape: &[u64], src: &[u8], offsets: &[u64], box_shape: &[u64], elem: usize) {
    if box_shape.contains(&0) {
        return;
    }
    let rank = shape.len();
    if rank == 0 {
        dst[..elem].copy_from_slice(&src[..elem]);
        return;
    }
    // Row-major strides of the global tensor, in elements.
    let mut strides = vec![1u64; rank];
    for d in (0..rank - 1).rev() {
        strides[d] = strides[d + 1] * shape[d + 1];
    }
    let row = box_shape[rank - 1] as usize * elem;
    let rows: u64 = box_shape[..rank - 1].iter().product();
    let mut index = vec![0u64; rank - 1];
    for r in 0..rows as usize {
        let mut at = offsets[rank - 1];
        for d in 0..rank - 1 {
            at += (offsets[d] + index[d]) * strides[d];
        }
        let at = at as usize * elem;
        dst[at..at + row].copy_from_slice(&src[r * row..(r + 1) * row]);
        for d in (0..rank - 1).rev() {
            index[d] += 1;
            if index[d] < box_shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_column_halves_rebuild_a_matrix() {
        // 2x4 matrix of u8 = [[0,1,2,3],[4,5,6,7]], saved as two 2x2 column halves.
        let left = [0u8, 1, 4, 5];
        let right = [2u8, 3, 6, 7];
        let mut dst = vec![0u8; 8];
        copy_box_into(&mut dst, &[2, 4], &left, &[0, 0], &[2, 2], 1);
        copy_box_into(&mut dst, &[2, 4], &right, &[0, 2], &[2, 2], 1);
        assert_eq!(dst, (0u8..8).collect::<Vec<_>>());
    }

    #[test]
    fn overlap_is_detected_per_dimension() {
        assert!(boxes_overlap(&[0, 0], &[2, 2], &[1, 1], &[2, 2]));
        assert!(!boxes_overlap(&[0, 0], &[2, 2], &[0, 2], &[2, 2]));
    }
}
