// `sqlx::migrate!` embeds the migrations at compile time; without this, a migration file added
// later would not make cargo build the crate again (sqlx's documented build script).
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}
