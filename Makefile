# The two commands a newcomer needs, and the checks CI runs. Every target installs what it needs.
.PHONY: up demo test lint bench nats

# Main job: a local fleet on a project-local nats-server (Ctrl-C stops everything).
up:
	cargo build --release --workspace --bins
	./target/release/drover up

# The same, with a small demo workload; exits when the demo is done.
demo:
	cargo build --release --workspace --bins
	./target/release/drover up --demo

# Every test, against real nats-server processes (installed into nats/bin/ first).
test: nats
	cargo test --workspace --locked

# Formatting and lints, as CI enforces them.
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

bench:
	cargo bench -p drover-shared --bench envelope

# The pinned server, and the 2.11 one the "server too old" test needs.
nats:
	bash nats/install.sh
	bash nats/install.sh 2.11.11
