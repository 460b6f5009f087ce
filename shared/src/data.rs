//! Fold files, rotations, the character tokenizer and the label index.
//!
//! A data set is a folder of `pfam{version}_fold_{k}.csv` files with the
//! header `string,label`. Rotation `r` of `n` folds with `t` training folds
//! trains on folds `r .. r+t-1` (mod n), validates on `r+t` and tests on
//! `r+t+1`. The vocabulary and the label index are fit on the training folds
//! only; sequences are padded and truncated at the front.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::DataSpec;
use crate::{Error, Result};

/// Token id of padding.
pub const PAD: u32 = 0;
/// Token id of any character not in the vocabulary.
pub const OOV: u32 = 1;

/// One row of a fold file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    /// The amino-acid string.
    pub sequence: String,
    /// The family label.
    pub label: String,
    /// 1-based line in the file (the header is line 1).
    pub line: u64,
}

/// The rows of one fold file.
#[derive(Debug, Clone)]
pub struct Fold {
    /// Where the rows came from.
    pub path: PathBuf,
    /// The rows in file order.
    pub examples: Vec<Example>,
}

/// The path of fold `k` in `dir`.
pub fn fold_path(dir: &Path, version: &str, k: usize) -> PathBuf {
    dir.join(format!("pfam{version}_fold_{k}.csv"))
}

/// Reads one fold file, checking the header and every line.
pub fn read_fold(path: &Path) -> Result<Fold> {
    if !path.exists() {
        return Err(Error::MissingFold {
            path: path.to_path_buf(),
        });
    }
    let file = std::fs::File::open(path).map_err(|error| Error::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let csv_err = |line: u64, message: String| Error::Csv {
        path: path.to_path_buf(),
        line,
        message,
    };

    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .from_reader(std::io::BufReader::new(file));
    let header = reader
        .headers()
        .map_err(|e| csv_err(1, format!("unreadable header: {e}")))?
        .clone();
    let names: Vec<&str> = header.iter().map(str::trim).collect();
    if names != ["string", "label"] {
        return Err(csv_err(
            1,
            format!("header is `{}`, expected `string,label`", names.join(",")),
        ));
    }

    let mut examples = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line()).unwrap_or(0);
            csv_err(line, format!("malformed CSV: {e}"))
        })?;
        let line = record.position().map(|p| p.line()).unwrap_or(0);
        if record.len() != 2 {
            return Err(csv_err(
                line,
                format!("expected 2 fields (string,label), found {}", record.len()),
            ));
        }
        let sequence = record[0].trim();
        let label = record[1].trim();
        if sequence.is_empty() {
            return Err(csv_err(line, "empty sequence".into()));
        }
        if label.is_empty() {
            return Err(csv_err(line, "empty label".into()));
        }
        examples.push(Example {
            sequence: sequence.to_string(),
            label: label.to_string(),
            line,
        });
    }

    if examples.is_empty() {
        return Err(Error::EmptyFold {
            path: path.to_path_buf(),
        });
    }
    Ok(Fold {
        path: path.to_path_buf(),
        examples,
    })
}

/// Which folds a rotation uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// Rotation index.
    pub index: usize,
    /// Training fold indices.
    pub train: Vec<usize>,
    /// Validation fold index.
    pub val: usize,
    /// Test fold index.
    pub test: usize,
}

impl Rotation {
    /// Rotation `r` of `folds` folds with `train_folds` training folds.
    pub fn new(r: usize, folds: usize, train_folds: usize) -> Result<Self> {
        if r >= folds {
            return Err(Error::Rotation {
                rotation: r,
                message: format!("only {folds} folds"),
            });
        }
        if train_folds == 0 || train_folds + 2 > folds {
            return Err(Error::Rotation {
                rotation: r,
                message: format!("{train_folds} training folds do not fit {folds} folds"),
            });
        }
        Ok(Self {
            index: r,
            train: (0..train_folds).map(|i| (r + i) % folds).collect(),
            val: (r + train_folds) % folds,
            test: (r + train_folds + 1) % folds,
        })
    }
}

/// Character vocabulary fit on training sequences: most frequent first
/// (ties by character), ids from 2; 0 is padding and 1 out-of-vocabulary.
///
/// Only upper-case ASCII letters (the one-letter amino-acid codes) enter the
/// vocabulary; any other character always maps to [`OOV`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vocab {
    /// Characters in id order; `chars[i]` has id `i + 2`.
    pub chars: Vec<char>,
}

impl Vocab {
    /// Fits the vocabulary on `sequences`.
    pub fn fit<'a>(sequences: impl IntoIterator<Item = &'a str>) -> Self {
        let mut counts: BTreeMap<char, u64> = BTreeMap::new();
        for s in sequences {
            for c in s.chars().filter(char::is_ascii_uppercase) {
                *counts.entry(c).or_default() += 1;
            }
        }
        let mut by_count: Vec<(char, u64)> = counts.into_iter().collect();
        by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        Self {
            chars: by_count.into_iter().map(|(c, _)| c).collect(),
        }
    }

    /// Number of token ids, padding and OOV included.
    pub fn size(&self) -> usize {
        self.chars.len() + 2
    }

    /// The id of one character.
    pub fn id(&self, c: char) -> u32 {
        self.chars
            .iter()
            .position(|&v| v == c)
            .map_or(OOV, |i| i as u32 + 2)
    }

    /// Encodes `seq` into exactly `len` ids, padding with [`PAD`] and
    /// truncating at the front (the last `len` characters are kept).
    /// Returns the ids and the number of out-of-vocabulary characters.
    pub fn encode(&self, seq: &str, len: usize) -> (Vec<u32>, usize) {
        let table = self.table();
        encode_with(&table, seq, len)
    }

    fn table(&self) -> [u32; 128] {
        let mut table = [OOV; 128];
        for (i, &c) in self.chars.iter().enumerate() {
            table[c as usize] = i as u32 + 2;
        }
        table
    }
}

fn encode_with(table: &[u32; 128], seq: &str, len: usize) -> (Vec<u32>, usize) {
    let chars: Vec<char> = seq.chars().collect();
    let kept = &chars[chars.len().saturating_sub(len)..];
    let mut ids = vec![PAD; len - kept.len()];
    let mut n_oov = 0;
    for &c in kept {
        let id = if c.is_ascii() { table[c as usize] } else { OOV };
        n_oov += usize::from(id == OOV);
        ids.push(id);
    }
    (ids, n_oov)
}

/// Labels fit on the training folds, in sorted order; the index of a label
/// is its class id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelIndex {
    /// Sorted label names.
    pub labels: Vec<String>,
}

impl LabelIndex {
    /// Fits the index on training labels.
    pub fn fit<'a>(labels: impl IntoIterator<Item = &'a str>) -> Self {
        let set: BTreeSet<&str> = labels.into_iter().collect();
        Self {
            labels: set.into_iter().map(str::to_string).collect(),
        }
    }

    /// Class id of a label, if it was seen in training.
    pub fn id(&self, label: &str) -> Option<u32> {
        self.labels
            .binary_search_by(|l| l.as_str().cmp(label))
            .ok()
            .map(|i| i as u32)
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no classes.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// Encoded examples of one split: `n` rows of `len` token ids.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    /// Row-major token ids, shape (n, len).
    pub tokens: Vec<u32>,
    /// Class id per row, shape (n).
    pub labels: Vec<u32>,
    /// Sequence length of every row.
    pub len: usize,
}

impl Encoded {
    /// Number of rows.
    pub fn n(&self) -> usize {
        self.labels.len()
    }
}

/// Out-of-vocabulary characters met while encoding a rotation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OovReport {
    /// Total out-of-vocabulary characters.
    pub n_chars: usize,
    /// The first one: file, line and character.
    pub first: Option<(PathBuf, u64, char)>,
}

/// Everything a job needs to train and test one rotation.
#[derive(Debug, Clone)]
pub struct RotationData {
    /// The folds used.
    pub rotation: Rotation,
    /// Character vocabulary of the training folds.
    pub vocab: Vocab,
    /// Label index of the training folds.
    pub labels: LabelIndex,
    /// Sequence length after padding/truncation.
    pub max_len: usize,
    /// Training split.
    pub train: Encoded,
    /// Validation split.
    pub val: Encoded,
    /// Test split.
    pub test: Encoded,
    /// Characters that mapped to OOV.
    pub oov: OovReport,
}

/// Loads, checks and encodes rotation `r` of a data set.
pub fn load_rotation(spec: &DataSpec, r: usize) -> Result<RotationData> {
    let rotation = Rotation::new(r, spec.folds, spec.train_folds)?;
    let read = |k: usize| read_fold(&fold_path(&spec.dir, &spec.version, k));

    let train_folds = rotation
        .train
        .iter()
        .map(|&k| read(k))
        .collect::<Result<Vec<_>>>()?;
    let val_fold = read(rotation.val)?;
    let test_fold = read(rotation.test)?;

    let train_examples = || train_folds.iter().flat_map(|f| f.examples.iter());
    let vocab = Vocab::fit(train_examples().map(|e| e.sequence.as_str()));
    let labels = LabelIndex::fit(train_examples().map(|e| e.label.as_str()));
    let max_len = spec.max_len.unwrap_or_else(|| {
        train_examples()
            .map(|e| e.sequence.chars().count())
            .max()
            .unwrap_or(1)
    });

    let table = vocab.table();
    let mut oov = OovReport::default();
    let mut encode = |folds: &[&Fold]| -> Result<Encoded> {
        let mut tokens = Vec::new();
        let mut ids = Vec::new();
        for fold in folds {
            for e in &fold.examples {
                let id = labels.id(&e.label).ok_or_else(|| Error::UnseenLabel {
                    label: e.label.clone(),
                    path: fold.path.clone(),
                    line: e.line,
                })?;
                let (row, n_oov) = encode_with(&table, &e.sequence, max_len);
                if n_oov > 0 && oov.first.is_none() {
                    let c = e
                        .sequence
                        .chars()
                        .find(|&c| !c.is_ascii() || table[c as usize] == OOV)
                        .unwrap_or('?');
                    oov.first = Some((fold.path.clone(), e.line, c));
                }
                oov.n_chars += n_oov;
                tokens.extend(row);
                ids.push(id);
            }
        }
        Ok(Encoded {
            tokens,
            labels: ids,
            len: max_len,
        })
    };

    let train = encode(&train_folds.iter().collect::<Vec<_>>())?;
    let val = encode(&[&val_fold])?;
    let test = encode(&[&test_fold])?;
    Ok(RotationData {
        rotation,
        vocab,
        labels,
        max_len,
        train,
        val,
        test,
        oov,
    })
}

/// Counts rows per fold and checks every fold parses; used by `plan`.
pub fn fold_sizes(spec: &DataSpec) -> Result<Vec<usize>> {
    (0..spec.folds)
        .map(|k| read_fold(&fold_path(&spec.dir, &spec.version, k)).map(|f| f.examples.len()))
        .collect()
}

/// Label counts of a fold, for diagnostics.
pub fn label_counts(fold: &Fold) -> HashMap<&str, usize> {
    let mut counts = HashMap::new();
    for e in &fold.examples {
        *counts.entry(e.label.as_str()).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_fold(dir: &Path, k: usize, body: &str) {
        std::fs::write(fold_path(dir, "", k), format!("string,label\n{body}")).unwrap();
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "rotsweep-data-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn data_spec(dir: &Path) -> DataSpec {
        DataSpec {
            dir: dir.to_path_buf(),
            version: String::new(),
            folds: 5,
            train_folds: 3,
            rotations: None,
            max_len: None,
        }
    }

    #[test]
    fn rotation_table_is_pinned_for_five_folds() {
        let table: Vec<(Vec<usize>, usize, usize)> = (0..5)
            .map(|r| {
                let rot = Rotation::new(r, 5, 3).unwrap();
                (rot.train, rot.val, rot.test)
            })
            .collect();
        assert_eq!(
            table,
            vec![
                (vec![0, 1, 2], 3, 4),
                (vec![1, 2, 3], 4, 0),
                (vec![2, 3, 4], 0, 1),
                (vec![3, 4, 0], 1, 2),
                (vec![4, 0, 1], 2, 3),
            ]
        );
        assert!(Rotation::new(5, 5, 3).is_err());
        assert!(Rotation::new(0, 5, 4).is_err());
    }

    #[test]
    fn vocabulary_is_most_frequent_first_with_ties_by_character() {
        let vocab = Vocab::fit(["AAB", "CCB", "A"]);
        // A:3, B:2, C:2 -> A, then B before C on the tie.
        assert_eq!(vocab.chars, vec!['A', 'B', 'C']);
        assert_eq!(vocab.id('A'), 2);
        assert_eq!(vocab.id('C'), 4);
        assert_eq!(vocab.id('Z'), OOV);
        assert_eq!(vocab.size(), 5);
    }

    #[test]
    fn encoding_pads_and_truncates_at_the_front() {
        let vocab = Vocab::fit(["ABC"]);
        assert_eq!(vocab.encode("AB", 4), (vec![PAD, PAD, 2, 3], 0));
        // Truncation drops the first characters, keeping the tail.
        assert_eq!(vocab.encode("ABCAB", 3), (vec![4, 2, 3], 0));
        // Non amino-acid characters go to OOV and are counted.
        assert_eq!(vocab.encode("A*b", 3), (vec![2, OOV, OOV], 2));
    }

    #[test]
    fn real_fold_files_load_and_encode() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/data/pfam-real");
        let mut spec = data_spec(&dir);
        spec.max_len = Some(64);
        let data = load_rotation(&spec, 1).unwrap();
        assert_eq!(data.rotation.test, 0);
        assert_eq!(data.labels.len(), 15);
        assert_eq!(data.train.tokens.len(), data.train.n() * 64);
        assert_eq!(data.vocab.chars.len(), 25.min(data.vocab.chars.len()));
        assert!(data.train.n() > 3 * 250 && data.val.n() > 250 && data.test.n() > 250);
        assert!(data
            .train
            .labels
            .iter()
            .all(|&l| (l as usize) < data.labels.len()));
    }

    #[test]
    fn label_only_in_test_fold_is_an_error_naming_label_file_and_line() {
        let dir = temp_dir("unseen");
        for k in 0..5 {
            let extra = if k == 4 { "MKV,Zeta\n" } else { "" };
            write_fold(&dir, k, &format!("AAA,Alpha\nCCC,Beta\n{extra}"));
        }
        let err = load_rotation(&data_spec(&dir), 0).unwrap_err().to_string();
        assert!(err.contains("`Zeta`"), "{err}");
        assert!(err.contains("pfam_fold_4.csv:4"), "{err}");
    }

    #[test]
    fn malformed_empty_and_missing_folds_are_named() {
        let dir = temp_dir("bad");
        write_fold(&dir, 0, "AAA,Alpha\nCCC,Beta,extra\n");
        let err = read_fold(&fold_path(&dir, "", 0)).unwrap_err().to_string();
        assert!(err.contains("pfam_fold_0.csv:3"), "{err}");

        write_fold(&dir, 1, "");
        let err = read_fold(&fold_path(&dir, "", 1)).unwrap_err().to_string();
        assert!(
            err.contains("empty fold") && err.contains("pfam_fold_1.csv"),
            "{err}"
        );

        std::fs::write(fold_path(&dir, "", 2), "seq,family\nAAA,Alpha\n").unwrap();
        let err = read_fold(&fold_path(&dir, "", 2)).unwrap_err().to_string();
        assert!(err.contains(":1:") && err.contains("string,label"), "{err}");

        write_fold(&dir, 3, "AAA,\n");
        let err = read_fold(&fold_path(&dir, "", 3)).unwrap_err().to_string();
        assert!(err.contains("pfam_fold_3.csv:2: empty label"), "{err}");

        let err = read_fold(&fold_path(&dir, "", 9)).unwrap_err().to_string();
        assert!(
            err.contains("missing fold") && err.contains("pfam_fold_9.csv"),
            "{err}"
        );
    }

    #[test]
    fn oov_characters_are_reported_with_their_first_location() {
        let dir = temp_dir("oov");
        for k in 0..5 {
            let body = if k == 3 {
                "AAA,Alpha\nCC*,Beta\n"
            } else {
                "AAA,Alpha\nCCC,Beta\n"
            };
            write_fold(&dir, k, body);
        }
        let data = load_rotation(&data_spec(&dir), 0).unwrap();
        assert_eq!(data.oov.n_chars, 1);
        let (path, line, c) = data.oov.first.unwrap();
        assert!(path.ends_with("pfam_fold_3.csv"));
        assert_eq!((line, c), (3, '*'));
    }
}
