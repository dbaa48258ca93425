//! The credential store against a simulated NOR flash that loses power after
//! any byte operation: every cut point of an update, of a renewal's whole
//! sequence (counter reservation, pending write, confirmation), and of two torn
//! first writes followed by a clean one. After each cut the device reboots (a
//! new store over the same memory) and must find a valid credential, every
//! write reported as successful, and no generation or counter going back.
// Helpers outside `#[test]` functions are test code too: a failure is a panic.
#![allow(clippy::unwrap_used)]

use idgate_agent::{Choice, Commit, Credential, CredentialStore, StoreError};
use idgate_sim::SimFlash;

const SLOT: u32 = SimFlash::SECTOR as u32;

/// A credential of realistic size whose bytes all say `tag`.
fn credential(tag: u8) -> Credential {
    let mut c = Credential::default();
    c.certificate.resize(560, tag).unwrap();
    c.chain.resize(470, tag ^ 0x5a).unwrap();
    c.key.resize(32, tag ^ 0xa5).unwrap();
    c
}

fn open(flash: SimFlash) -> CredentialStore<SimFlash> {
    CredentialStore::open(flash, 0, SLOT).unwrap()
}

fn newest(store: &mut CredentialStore<SimFlash>) -> Option<Credential> {
    let mut out = Credential::default();
    match store.load(Choice::Newest, &mut out) {
        Ok(()) => Some(out),
        Err(StoreError::Empty) => None,
        Err(e) => panic!("load: {e}"),
    }
}

/// Two confirmed generations (1 in A, 2 in B), counter 5.
fn seasoned() -> Vec<u8> {
    let flash = SimFlash::new(2);
    let mut store = open(flash.clone());
    store.write(&credential(1), Commit::Confirmed, 100).unwrap();
    let mut scratch = Credential::default();
    for _ in 0..5 {
        store.reserve_counter(&mut scratch, 100).unwrap();
    }
    store.write(&credential(2), Commit::Confirmed, 200).unwrap();
    let status = store.status();
    assert_eq!((status.counter, status.pending), (5, false));
    flash.snapshot()
}

#[test]
fn a_full_renewal_survives_a_cut_at_every_byte() {
    let start = seasoned();
    let before = open(SimFlash::with_memory(start.clone())).status();
    // One renewal: reserve a counter, write the new credential pending,
    // confirm it once it has worked.
    let renewal = |flash: SimFlash, progress: &mut Vec<(u32, u64, bool)>| {
        let mut store = CredentialStore::open(flash, 0, SLOT)?;
        let mut scratch = Credential::default();
        let counter = store.reserve_counter(&mut scratch, 300)?;
        progress.push((store.status().generation, counter, false));
        store.write(&credential(3), Commit::Pending, 400)?;
        progress.push((store.status().generation, counter, true));
        store.confirm()?;
        progress.push((store.status().generation, counter, true));
        Ok::<_, StoreError>(())
    };
    let clean = SimFlash::with_memory(start.clone());
    renewal(clean.clone(), &mut Vec::new()).unwrap();
    let total = clean.operations();
    assert!(total > 2 * SimFlash::SECTOR as u64, "{total}");

    for n in 0..=total {
        let flash = SimFlash::with_memory(start.clone()).cut_after(n);
        let mut progress = Vec::new();
        let result = renewal(flash.clone(), &mut progress);
        assert_eq!(result.is_ok(), n == total, "cut {n}");
        let mut store = open(flash.restart());
        let status = store.status();
        let booted = newest(&mut store).expect("a credential after every cut");
        assert!(
            booted == credential(2) || booted == credential(3),
            "cut {n}: unknown credential"
        );
        assert!(status.has_confirmed, "cut {n}");
        assert!(status.generation >= before.generation, "cut {n}");
        assert!(status.counter >= before.counter, "cut {n}");
        if let Some(&(generation, counter, new_written)) = progress.last() {
            assert!(status.generation >= generation, "cut {n}");
            assert!(status.counter >= counter, "cut {n}");
            if new_written {
                assert_eq!(booted, credential(3), "cut {n}");
            }
        }
        if progress.len() == 3 {
            assert!(!status.pending, "cut {n}");
        }
        // The fallback is always the old credential or, once confirmed, the new.
        let mut fallback = Credential::default();
        store.load(Choice::Confirmed, &mut fallback).unwrap();
        assert!(fallback == credential(2) || fallback == credential(3));
        // And the device goes on: the next update works.
        if status.pending {
            store.confirm().unwrap();
        }
        store.write(&credential(4), Commit::Confirmed, 500).unwrap();
        let mut store = open(flash.restart());
        assert_eq!(newest(&mut store), Some(credential(4)));
        assert!(store.status().not_earlier_than >= 500);
    }
    println!("renewal sequence: {} cut points", total + 1);
}

#[test]
fn two_torn_first_writes_then_a_clean_one() {
    let first = |flash: SimFlash| {
        let mut store = CredentialStore::open(flash, 0, SLOT)?;
        store.write(&credential(1), Commit::Confirmed, 100)
    };
    let clean = SimFlash::new(2);
    first(clean.clone()).unwrap();
    let total = clean.operations();
    let mut combinations = 0;
    for n1 in 0..total {
        for n2 in [n1, total - 1 - n1, (n1 * 7919 + 13) % total] {
            let flash = SimFlash::new(2).cut_after(n1);
            assert!(first(flash.clone()).is_err());
            let flash = flash.restart();
            // Nothing was reported written: nothing may be found but garbage
            // must not pass either.
            let mut store = open(flash.clone());
            let found = newest(&mut store);
            assert!(found.is_none() || found == Some(credential(1)), "cut {n1}");
            let flash = flash.restart().cut_after(n2);
            assert!(first(flash.clone()).is_err());
            let flash = flash.restart();
            first(flash.clone()).unwrap();
            let mut store = open(flash.restart());
            assert_eq!(newest(&mut store), Some(credential(1)), "cuts {n1}, {n2}");
            let status = store.status();
            assert!(status.generation >= 1 && !status.pending);
            combinations += 1;
        }
    }
    println!("first writes: {total} ops, {combinations} torn pairs");
}

#[test]
fn a_pending_credential_keeps_the_old_one_until_confirmed() {
    let flash = SimFlash::with_memory(seasoned());
    let mut store = open(flash.clone());
    store.write(&credential(3), Commit::Pending, 300).unwrap();
    let status = store.status();
    assert!(status.pending && status.has_confirmed);
    assert_eq!(status.counter, 5, "a new credential carries the counter");
    // A renewal now would have to overwrite the fallback: refused.
    let mut scratch = Credential::default();
    assert_eq!(
        store.reserve_counter(&mut scratch, 0),
        Err(StoreError::Pending)
    );
    let mut store = open(flash.restart());
    assert_eq!(newest(&mut store), Some(credential(3)));
    let mut fallback = Credential::default();
    store.load(Choice::Confirmed, &mut fallback).unwrap();
    assert_eq!(fallback, credential(2));
    // It did not work: back to the old one, with the counter intact.
    store.discard_pending().unwrap();
    assert_eq!(store.discard_pending(), Err(StoreError::NoPending));
    let mut store = open(flash.restart());
    assert_eq!(newest(&mut store), Some(credential(2)));
    assert_eq!(store.status().counter, 5);
    assert_eq!(store.confirm(), Err(StoreError::NoPending));
    assert_eq!(store.reserve_counter(&mut scratch, 0), Ok(6));
}

#[test]
fn unusable_regions_are_refused() {
    for (base, slot) in [(0, 2048), (100, SLOT), (0, 3 * SLOT), (SLOT, SLOT)] {
        assert_eq!(
            CredentialStore::open(SimFlash::new(2), base, slot).err(),
            Some(StoreError::Layout),
            "{base} {slot}"
        );
    }
    let mut empty = open(SimFlash::new(2));
    assert_eq!(empty.status().generation, 0);
    assert_eq!(newest(&mut empty), None);
    let mut scratch = Credential::default();
    assert_eq!(
        empty.reserve_counter(&mut scratch, 0),
        Err(StoreError::Empty)
    );
}

#[test]
fn corruption_of_the_newest_falls_back_to_the_other_slot() {
    let mut memory = seasoned();
    // Slot A holds the newest record (generation 7, credential 2; the counter
    // reservations wrote generations 2 to 6, copies of credential 1). Flip one
    // bit inside its certificate.
    assert_eq!(
        open(SimFlash::with_memory(memory.clone()))
            .status()
            .generation,
        7
    );
    memory[200] ^= 0x10;
    let mut store = open(SimFlash::with_memory(memory));
    assert_eq!(newest(&mut store), Some(credential(1)));
    assert_eq!(store.status().generation, 6);
}

#[test]
fn random_flash_contents_never_panic() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let good = seasoned();
    for round in 0..500 {
        let mut memory = good.clone();
        match round % 3 {
            // Pure noise, but with a plausible magic and version.
            0 => {
                rng.fill(&mut memory[..]);
                for slot in [0, SimFlash::SECTOR] {
                    memory[slot + 32..slot + 37].copy_from_slice(b"IDGC\x01");
                }
            }
            // A good store with a few random bytes changed.
            1 => {
                for _ in 0..rng.gen_range(1..8) {
                    let at = rng.gen_range(0..memory.len());
                    memory[at] = rng.r#gen();
                }
            }
            // Random lengths in otherwise good headers.
            _ => {
                for slot in [0, SimFlash::SECTOR] {
                    let at = slot + 32 + 12 + 2 * rng.gen_range(0..3);
                    memory[at] = rng.r#gen();
                    memory[at + 1] = rng.r#gen();
                }
            }
        }
        let mut store = open(SimFlash::with_memory(memory));
        let mut out = Credential::default();
        for choice in [Choice::Newest, Choice::Confirmed] {
            match store.load(choice, &mut out) {
                Ok(()) => assert!(out == credential(1) || out == credential(2)),
                Err(StoreError::Empty) => {}
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        // Whatever was found, the next write works and reads back.
        store.write(&credential(9), Commit::Confirmed, 0).unwrap();
        assert_eq!(newest(&mut store), Some(credential(9)));
    }
}
