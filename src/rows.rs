//! Reading a table's row as stored, by column name, without a query: for the two per-job
//! paths where a statement's executor start-up would cost more than the work (the
//! invariants trigger of `queue.jobs`, enqueue's look-up of its queue). By name because
//! column numbers differ between a fresh install and an upgraded one (ALTER TABLE ADD
//! COLUMN appends).

use pgrx::pg_sys;

/// The values of the columns `names` in `tuple` (None for NULL or no such column). Values
/// of variable length point into the tuple and are not detoasted.
///
/// # Safety
/// `tuple` must be a valid heap tuple of a relation whose descriptor is `desc`.
pub unsafe fn named_columns<const N: usize>(
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    names: &[&str; N],
) -> [Option<pg_sys::Datum>; N] {
    // SAFETY: heap_deform_tuple fills one value and one null flag per attribute of desc.
    unsafe {
        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        pg_sys::heap_deform_tuple(tuple, desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let mut found = [None; N];
        for i in 0..natts {
            let att = &*(*desc).attrs.as_ptr().add(i);
            if att.attisdropped || nulls[i] {
                continue;
            }
            let name = std::ffi::CStr::from_ptr(att.attname.data.as_ptr()).to_bytes();
            if let Some(c) = names.iter().position(|n| n.as_bytes() == name) {
                found[c] = Some(values[i]);
            }
        }
        found
    }
}
