//! Parquet files as Hugging Face `datasets` writes them, read row by row
//! into JSON objects: strings, numbers, booleans, nulls, nested lists and
//! structs (a conversational column is `list<struct<role, content>>`).
//! Snappy and Zstd pages are read; the `parquet` crate (arrow-rs) does the
//! decoding, without Arrow.

use std::path::Path;

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::Field;
use serde_json::{Map, Number, Value};

use crate::records::{DataError, Location, Row};

/// A Parquet value as JSON; `column` names it in errors.
fn to_json(field: &Field, column: &str) -> Result<Value, String> {
    Ok(match field {
        Field::Null => Value::Null,
        Field::Bool(b) => Value::Bool(*b),
        Field::Byte(n) => (*n).into(),
        Field::Short(n) => (*n).into(),
        Field::Int(n) => (*n).into(),
        Field::Long(n) => (*n).into(),
        Field::UByte(n) => (*n).into(),
        Field::UShort(n) => (*n).into(),
        Field::UInt(n) => (*n).into(),
        Field::ULong(n) => (*n).into(),
        Field::Float16(x) => Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number),
        Field::Float(x) => Number::from_f64(f64::from(*x)).map_or(Value::Null, Value::Number),
        Field::Double(x) => Number::from_f64(*x).map_or(Value::Null, Value::Number),
        Field::Str(s) => Value::String(s.clone()),
        Field::Bytes(b) => Value::String(
            std::str::from_utf8(b.data())
                .map_err(|_| format!("column `{column}`: binary data that is not UTF-8 text"))?
                .to_string(),
        ),
        Field::Group(row) => {
            let mut obj = Map::new();
            for (name, value) in row.get_column_iter() {
                obj.insert(name.clone(), to_json(value, &format!("{column}.{name}"))?);
            }
            Value::Object(obj)
        }
        Field::ListInternal(list) => Value::Array(
            list.elements()
                .iter()
                .enumerate()
                .map(|(i, f)| to_json(f, &format!("{column}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Field::MapInternal(map) => {
            let mut obj = Map::new();
            for (k, v) in map.entries() {
                let key = match to_json(k, column)? {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                obj.insert(key.clone(), to_json(v, &format!("{column}.{key}"))?);
            }
            Value::Object(obj)
        }
        // Decimals, dates and times: as the crate prints them.
        other => Value::String(other.to_string()),
    })
}

/// Every row of a Parquet file, numbered from 0.
pub fn read_rows(path: &Path) -> Result<Vec<Row>, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io { path: path.into(), source })?;
    let not_parquet = |e: parquet::errors::ParquetError| DataError::File {
        path: path.into(),
        message: format!("not a readable Parquet file ({e})"),
    };
    let reader = SerializedFileReader::new(file).map_err(not_parquet)?;
    let rows = reader.get_row_iter(None).map_err(not_parquet)?;
    // No capacity from the footer's row count: a damaged footer could ask for anything.
    let mut out = Vec::new();
    for (i, row) in rows.enumerate() {
        let at = Location { path: path.into(), index: i, parquet: true };
        let row = row.map_err(|e| DataError::record(&at, format!("unreadable ({e})")))?;
        let mut fields = Map::new();
        for (name, value) in row.get_column_iter() {
            fields.insert(name.clone(), to_json(value, name).map_err(|m| DataError::record(&at, m))?);
        }
        out.push(Row { at, fields });
    }
    Ok(out)
}
