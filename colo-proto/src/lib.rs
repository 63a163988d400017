//! colo-proto: the COLO checkpoint wire protocol (work in progress, see issue 2).
