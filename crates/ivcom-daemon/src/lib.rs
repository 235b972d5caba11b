//! The ivshmem-server-compatible daemon (being written).
