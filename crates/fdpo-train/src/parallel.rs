//! Data parallelism over MPI: which rank this process is, the collectives
//! the training loop needs (sum of gradients, sum of counters, gathering
//! logging windows, barriers), and how a failing rank stops the job.
//!
//! One process without a launcher is rank 0 of 1 and every collective is a
//! no-op, so the default build and an `mpi` build run alone exactly as
//! before. With the `mpi` feature and a launcher (`mpirun`, `srun`: their
//! environment names the ranks), [`init`] starts MPI (rsmpi over the
//! system's library) and the world communicator holds every rank.
//!
//! The global batch of a step is what one process would use:
//! `gradient_accumulation_steps` micro-batches of the one data order. Rank
//! r of N takes a contiguous share of them ([`micro_batches_of`]); each
//! micro-batch's loss is divided by the accumulation as one process
//! divides it, and the gradients are summed across ranks, so results do not
//! depend on N (bit for bit when each rank's share is one micro-batch: a
//! sum of two terms is the same in either order) and a run may resume with
//! another number of ranks. Rank 0 alone writes the run folder.

use std::ops::Range;
use std::sync::OnceLock;

/// (rank, size) of this process, set once by [`init`].
static WORLD: OnceLock<(usize, usize)> = OnceLock::new();

/// This process's rank (0 without a launcher).
pub fn rank() -> usize {
    WORLD.get().map_or(0, |w| w.0)
}

/// The number of ranks (1 without a launcher).
pub fn size() -> usize {
    WORLD.get().map_or(1, |w| w.1)
}

/// Whether this process writes the run folder and the logs.
pub fn is_root() -> bool {
    rank() == 0
}

/// The micro-batches (offsets within a step, `0..accum`) that `rank` of
/// `size` computes: a contiguous share, the first `accum % size` ranks one
/// more than the rest. Every offset belongs to exactly one rank.
pub fn micro_batches_of(accum: usize, rank: usize, size: usize) -> Range<usize> {
    let (base, extra) = (accum / size, accum % size);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Keeps MPI initialised while alive; dropping it finalises MPI.
pub struct Guard {
    #[cfg(feature = "mpi")]
    _universe: Option<mpi::environment::Universe>,
}

/// Whether an MPI launcher started this process: Open MPI's mpirun, a
/// PMI launcher (MPICH's Hydra, `srun --mpi=pmi2`) or a PMIx one (Open MPI 5,
/// `srun --mpi=pmix`). Slurm's own variables do not count: a batch script
/// that runs fdpo without srun is one process.
pub fn launched() -> bool {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"].iter().any(|k| std::env::var_os(k).is_some())
}

/// Starts MPI when a launcher started this process and the `mpi` feature
/// is built in; otherwise this is rank 0 of 1. Call once, first thing, and
/// keep the guard until the program ends. Errors when a launcher is
/// present but the feature is not (N copies of one run would each write
/// the same folder).
pub fn init() -> Result<Guard, String> {
    #[cfg(feature = "mpi")]
    {
        use mpi::traits::Communicator;
        if launched() {
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .ok_or("MPI was already initialised")?;
            let world = universe.world();
            let (rank, size) = (world.rank() as usize, world.size() as usize);
            let _ = WORLD.set((rank, size));
            return Ok(Guard { _universe: Some(universe) });
        }
        let _ = WORLD.set((0, 1));
        Ok(Guard { _universe: None })
    }
    #[cfg(not(feature = "mpi"))]
    {
        let ranks = std::env::var("OMPI_COMM_WORLD_SIZE").or_else(|_| std::env::var("PMI_SIZE"));
        if ranks.as_deref().is_ok_and(|n| n != "1") {
            return Err("started by an MPI launcher, but this fdpo was built without the `mpi` feature \
                        (cargo build --release -p fdpo-cli --features mpi)"
                .into());
        }
        let _ = WORLD.set((0, 1));
        Ok(Guard {})
    }
}

#[cfg(feature = "mpi")]
fn world() -> mpi::topology::SimpleCommunicator {
    mpi::topology::SimpleCommunicator::world()
}

/// Largest number of elements one MPI call moves (its counts are C ints).
#[cfg(feature = "mpi")]
const CHUNK: usize = 1 << 26;

/// Replaces `buf` by its element-wise sum over all ranks.
pub fn all_reduce_sum_f32(buf: &mut [f32]) {
    #[cfg(feature = "mpi")]
    if size() > 1 {
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        let w = world();
        let mut send = Vec::new();
        for chunk in buf.chunks_mut(CHUNK) {
            send.clear();
            send.extend_from_slice(chunk);
            w.all_reduce_into(&send[..], chunk, SystemOperation::sum());
        }
    }
    let _ = buf;
}

/// Replaces `buf` by its element-wise sum over all ranks.
pub fn all_reduce_sum_f64(buf: &mut [f64]) {
    #[cfg(feature = "mpi")]
    if size() > 1 {
        use mpi::collective::{CommunicatorCollectives, SystemOperation};
        let send = buf.to_vec();
        world().all_reduce_into(&send[..], buf, SystemOperation::sum());
    }
    let _ = buf;
}

/// Every rank's `bytes`, in rank order, on every rank.
pub fn all_gather_bytes(bytes: &[u8]) -> Vec<Vec<u8>> {
    #[cfg(feature = "mpi")]
    if size() > 1 {
        use mpi::traits::{Communicator, Root};
        let w = world();
        let mut out = Vec::with_capacity(size());
        for r in 0..size() {
            let root = w.process_at_rank(r as i32);
            let mut len = if r == rank() { bytes.len() as u64 } else { 0 };
            root.broadcast_into(&mut len);
            let mut buf = if r == rank() { bytes.to_vec() } else { vec![0u8; len as usize] };
            root.broadcast_into(&mut buf[..]);
            out.push(buf);
        }
        return out;
    }
    vec![bytes.to_vec()]
}

/// Waits until every rank has arrived.
pub fn barrier() {
    #[cfg(feature = "mpi")]
    if size() > 1 {
        use mpi::collective::CommunicatorCollectives;
        world().barrier();
    }
}

/// Prints `message` and stops every rank of the job (MPI_Abort), so that
/// the others do not wait for this one forever; alone, exits with 1.
pub fn abort(message: &str) -> ! {
    eprintln!("{message}");
    #[cfg(feature = "mpi")]
    if size() > 1 {
        use mpi::traits::Communicator;
        world().abort(1);
    }
    std::process::exit(1)
}

/// A test hook: `FDPO_TEST_FAIL=RANK:STEP` makes rank RANK fail when it
/// starts step STEP, to check that one failing rank stops the whole job.
pub fn injected_failure(step: usize) -> Option<String> {
    let spec = std::env::var("FDPO_TEST_FAIL").ok()?;
    let (r, s) = spec.split_once(':')?;
    (r.parse() == Ok(rank()) && s.parse() == Ok(step))
        .then(|| format!("injected failure at step {step} (FDPO_TEST_FAIL={spec})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splitting every step of an epoch over N ranks gives each example to
    /// exactly one rank, for N = 1, 2, 3 and accumulations N does not divide,
    /// with a last micro-batch shorter than the rest.
    #[test]
    fn every_example_goes_to_exactly_one_rank() {
        let (n, batch) = (23usize, 4); // 6 micro-batches, the last of 3 examples
        let per_epoch = n.div_ceil(batch);
        for size in 1..=3 {
            for accum in [1, 2, 3, 5, 6] {
                let mut seen = vec![0; n];
                let steps = per_epoch.div_ceil(accum);
                for step in 0..steps {
                    for rank in 0..size {
                        for offset in micro_batches_of(accum, rank, size) {
                            let k = step * accum + offset;
                            if k < per_epoch {
                                for e in &mut seen[k * batch..((k + 1) * batch).min(n)] {
                                    *e += 1;
                                }
                            }
                        }
                    }
                }
                assert!(seen.iter().all(|&c| c == 1), "size {size}, accum {accum}: {seen:?}");
            }
        }
    }

    #[test]
    fn shares_are_contiguous_and_balanced() {
        assert_eq!(micro_batches_of(5, 0, 2), 0..3);
        assert_eq!(micro_batches_of(5, 1, 2), 3..5);
        assert_eq!(micro_batches_of(2, 2, 3), 2..2);
        assert_eq!(micro_batches_of(4, 0, 1), 0..4);
    }

    /// Without a launcher this is rank 0 of 1 and the collectives leave
    /// their buffers as they are.
    #[test]
    fn alone_the_collectives_are_identities() {
        let mut x = [1.5f32, -2.0];
        all_reduce_sum_f32(&mut x);
        assert_eq!(x, [1.5, -2.0]);
        assert_eq!(all_gather_bytes(b"ab"), vec![b"ab".to_vec()]);
        assert_eq!((rank(), size()), (0, 1));
    }
}
