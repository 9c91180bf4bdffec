//! A checkpoint whose ranks a framework coordinates (torch DCP's flow): each rank writes
//! its part, one coordinator commits them all.

use cairn::parts::{commit_parts, write_part, Part};
use cairn::{DType, ErrorKind, LoadOptions, Location, Piece, SaveOptions, State, Tensor, Value};

/// Rows `lo..lo+len` of a [6, 4] f32 tensor whose element i is i.
fn rows(lo: u64, len: u64) -> Piece {
    let data: Vec<u8> = (lo * 4..(lo + len) * 4).flat_map(|i| (i as f32).to_le_bytes()).collect();
    Piece {
        tensor: Tensor::new(DType::F32, vec![len, 4], data).unwrap(),
        offsets: vec![lo, 0],
        global_shape: vec![6, 4],
    }
}

fn whole(values: &[f32]) -> Piece {
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let n = values.len() as u64;
    Piece { tensor: Tensor::new(DType::F32, vec![n], data).unwrap(), offsets: vec![0], global_shape: vec![n] }
}

fn skeleton() -> State {
    let mut state = State::new();
    state.insert_value("epoch", Value::Int(3));
    state
}

/// Writes rank 0's rows 0..2 and "bias", rank 1's rows 2..6, then commits.
fn write_two(dest: &Location) -> Vec<Part> {
    let opts = SaveOptions::default();
    let mut r0 = State::new();
    r0.insert_piece("w", rows(0, 2));
    r0.insert_piece("bias", whole(&[1.0, 2.0]));
    let mut r1 = State::new();
    r1.insert_piece("w", rows(2, 4));
    vec![write_part(dest, &r0, 0, &opts).unwrap(), write_part(dest, &r1, 1, &opts).unwrap()]
}

#[test]
fn parts_written_by_two_ranks_commit_once_and_load_whole() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Location::create(dir.path().join("step-000000000007").to_str().unwrap()).unwrap();
    let parts = write_two(&dest);
    // Nothing is visible before the commit.
    assert!(cairn::Checkpoint::open_at(dest.clone()).is_err());
    // Parts travel as bytes.
    let parts: Vec<Part> = parts
        .iter()
        .map(|p| Part::from_bytes(&p.to_bytes().unwrap(), &format!("rank {}", p.rank())).unwrap())
        .collect();
    let info = commit_parts(&dest, &skeleton(), &SaveOptions::default(), 2, parts).unwrap();
    assert_eq!(info.step, 7);

    let ckpt = cairn::Checkpoint::open_at(dest.clone()).unwrap();
    assert!(ckpt.verify().unwrap().is_empty());
    let state = ckpt.load(&LoadOptions::default()).unwrap();
    assert_eq!(state.value("epoch"), Some(&Value::Int(3)));
    let w = state.tensor("w").unwrap();
    assert_eq!(w.shape(), &[6, 4]);
    let expect: Vec<u8> = (0..24).flat_map(|i| (i as f32).to_le_bytes()).collect();
    assert_eq!(w.data().as_ref(), expect.as_slice());
    assert_eq!(state.tensor("bias").unwrap().shape(), &[2]);

    // A committed folder is never written again.
    let mut again = State::new();
    again.insert_piece("w", rows(0, 6));
    let err = write_part(&dest, &again, 0, &SaveOptions::default()).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);
}

#[test]
fn a_hole_or_a_disagreement_between_parts_commits_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dest = Location::create(dir.path().join("ckpt").to_str().unwrap()).unwrap();
    let mut parts = write_two(&dest);
    parts.pop(); // rank 1's rows never arrive
    let err = commit_parts(&dest, &skeleton(), &SaveOptions::default(), 2, parts).unwrap_err();
    assert!(err.to_string().contains("`w`"), "{err}");
    assert!(cairn::Checkpoint::open_at(dest.clone()).is_err());

    let mut r1 = State::new();
    let mut other = rows(2, 4);
    other.global_shape = vec![7, 4];
    r1.insert_piece("w", other);
    let mut parts = write_two(&dest);
    parts[1] = write_part(&dest, &r1, 1, &SaveOptions::default()).unwrap();
    let err = commit_parts(&dest, &skeleton(), &SaveOptions::default(), 2, parts).unwrap_err();
    assert!(err.to_string().contains("ranks disagree on tensor key=`w`"), "{err}");

    let err = commit_parts(&dest, &skeleton(), &SaveOptions::default(), 1, write_two(&dest)).unwrap_err();
    assert!(err.to_string().contains("rank 1 in a job of 1"), "{err}");
    assert!(cairn::Checkpoint::open_at(dest).is_err());
}

#[test]
fn parts_saved_into_a_run_land_in_its_step_folder() {
    let dir = tempfile::tempdir().unwrap();
    let run = Location::create(dir.path().to_str().unwrap()).unwrap();
    let opts = SaveOptions::default().with_step(12);
    let mut r0 = State::new();
    r0.insert_piece("w", rows(0, 6));
    let part = write_part(&run, &r0, 0, &opts).unwrap();
    commit_parts(&run, &skeleton(), &opts, 1, vec![part]).unwrap();
    let (state, info) = cairn::load(dir.path().to_str().unwrap(), &LoadOptions::default()).unwrap();
    assert_eq!(info.step, 12);
    assert_eq!(state.tensor("w").unwrap().shape(), &[6, 4]);
}
