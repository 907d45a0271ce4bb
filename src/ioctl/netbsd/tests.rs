//! Tests of the proplib codec against the engine: committed snapshots of every command's exact
//! request and reply (with the Linux face's reply beside it), and a proptest that runs the same
//! command sequences through both codecs into two engines.

mod equivalence;
mod harness;
mod names;
mod snapshots;
