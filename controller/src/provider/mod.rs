//! Providers' executors: the IO side of the provider planners. `ec2` converges EC2 to the
//! instance records on the leader; local instances need none here (agents run them).

pub mod ec2;
