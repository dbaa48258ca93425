//! `idgate batch import/list/show` as a line operator runs them, on SQLite
//! and on PostgreSQL: bad files are refused with their line number and leave
//! nothing behind; a good file registers every device in one go and writes the
//! tokens to a 0600 file, never to the terminal.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::{Command, Output};

use idgate_gateway::testing::{TestDatabase, registry_url};

fn idgate(data: &Path, database: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_idgate"));
    command
        .arg("--data")
        .arg(data)
        .arg("--database")
        .arg(database);
    command
}

fn run(command: &mut Command) -> Output {
    command.output().expect("run idgate")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_import_sqlite() {
    batch_import(TestDatabase::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_import_postgres() {
    batch_import(TestDatabase::Postgres).await;
}

async fn batch_import(db: TestDatabase) {
    let Some(registry) = registry_url(db).await else {
        return;
    };
    let url = registry.url.clone();
    let dir = tempfile::tempdir().expect("temporary directory");
    let data = dir.path().join("data");
    let init = run(idgate(&data, &url).args(["ca", "init"]));
    assert!(init.status.success(), "{}", text(&init.stderr));
    let import = |file: &Path| {
        run(idgate(&data, &url)
            .args(["batch", "import"])
            .arg(file)
            .args(["--owner", "line@example.com", "--site", "plant-1"]))
    };

    // One device registered by hand: a batch naming it is refused whole.
    let added = run(idgate(&data, &url).args([
        "device",
        "add",
        "sn-0007",
        "--owner",
        "a@example.com",
        "--site",
        "lab",
    ]));
    assert!(added.status.success(), "{}", text(&added.stderr));

    let bad: [(&str, &[u8], &str); 7] = [
        (
            "dup.csv",
            b"id\nsn-1\nsn-2\nsn-1\n",
            "line 4: device id \"sn-1\" is also on line 2",
        ),
        (
            "chars.csv",
            b"id\nsn-1\nsn 2\n",
            "line 3: device id \"sn 2\"",
        ),
        ("columns.csv", b"id,site\nsn-1,a\nsn-2\n", "line 3: 1 cells"),
        (
            "noid.csv",
            b"serialnumber\nsn-1\n",
            "line 1: unknown column",
        ),
        (
            "owner.csv",
            b"id,owner\nsn-1,nobody\n",
            "line 2: owner must be",
        ),
        (
            "taken.csv",
            b"id\nsn-1\nsn-0007\n",
            "line 3: device id \"sn-0007\" is already registered",
        ),
        (
            "garbage.csv",
            &[0xc3, 0x28, 0xa0, 0xa1, 0xff, 0x00, 0x10],
            "line 1: ",
        ),
    ];
    for (name, content, expected) in bad {
        let file = dir.path().join(name);
        std::fs::write(&file, content).expect("write CSV");
        let output = import(&file);
        let stderr = text(&output.stderr);
        assert!(!output.status.success(), "{name} was accepted");
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(stderr.contains("nothing was imported"), "{name}: {stderr}");
        let stem = name.trim_end_matches(".csv");
        assert!(
            !dir.path().join(format!("{stem}.tokens.csv")).exists(),
            "{name}: a refused import leaves no token file"
        );
    }
    let devices = run(idgate(&data, &url).args(["device", "list"]));
    assert!(
        text(&devices.stdout).contains("1 device(s)"),
        "{}",
        text(&devices.stdout)
    );

    // A spreadsheet export: BOM, CRLF, per-row owner and model, a blank line.
    let file = dir.path().join("line-7.csv");
    std::fs::write(
        &file,
        b"\xef\xbb\xbfid,owner,model\r\nsn-1,,\r\nsn-2,b@example.com,th-2\r\n\r\nsn-3,,\r\n",
    )
    .expect("write CSV");
    let output = run(idgate(&data, &url)
        .args(["batch", "import"])
        .arg(&file)
        .args([
            "--owner",
            "line@example.com",
            "--site",
            "plant-1",
            "--model",
            "th-1",
        ])
        .args(["--batch", "line-7"]));
    assert!(output.status.success(), "{}", text(&output.stderr));
    let tokens_path = dir.path().join("line-7.tokens.csv");
    let mode = std::fs::metadata(&tokens_path)
        .expect("token file")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let tokens = std::fs::read_to_string(&tokens_path).expect("token file");
    let lines: Vec<&str> = tokens.lines().collect();
    assert_eq!(lines[0], "id,token");
    assert_eq!(lines.len(), 4, "{tokens}");
    for line in &lines[1..] {
        let (id, token) = line.split_once(',').expect("id,token");
        assert!(id.starts_with("sn-"));
        assert_eq!(token.len(), 32);
        let said = format!("{}{}", text(&output.stdout), text(&output.stderr));
        assert!(!said.contains(token), "a token was printed");
    }
    // Importing again never overwrites the token file.
    let again = run(idgate(&data, &url)
        .args(["batch", "import"])
        .arg(&file)
        .args(["--owner", "line@example.com", "--site", "plant-1"]));
    assert!(!again.status.success());
    assert_eq!(
        std::fs::read_to_string(&tokens_path).expect("token file"),
        tokens
    );

    let show = run(idgate(&data, &url).args(["device", "show", "sn-2", "--json"]));
    let shown = text(&show.stdout);
    assert!(
        shown.contains("b@example.com") && shown.contains("th-2"),
        "{shown}"
    );

    let list = run(idgate(&data, &url).args(["batch", "list", "--json"]));
    let batches: serde_json::Value = serde_json::from_slice(&list.stdout).expect("JSON");
    assert_eq!(batches.as_array().map(Vec::len), Some(1), "{batches}");
    assert_eq!(batches[0]["id"], "line-7");
    assert_eq!(batches[0]["registered"], 3);
    assert_eq!(batches[0]["enrolled"], 0);
    assert_eq!(batches[0]["failed"], 0);
    assert_eq!(batches[0]["pending"], 3);
    let show = run(idgate(&data, &url).args(["batch", "show", "line-7"]));
    let shown = text(&show.stdout);
    assert!(
        shown.contains("registered  3") && shown.contains("sn-3"),
        "{shown}"
    );
    let missing = run(idgate(&data, &url).args(["batch", "show", "nope"]));
    assert!(!missing.status.success());
}
