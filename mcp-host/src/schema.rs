//! Schemas as JSON Schema 2020-12 validators take them: schemars writes
//! non-standard `format`s for Rust integer types ("uint32", "int64", ...),
//! which MCP Inspector and other validators warn about. Every schema nexusd
//! lists, its own and each guest's, goes through [`standardise`] once
//! (nexusd's at start, a guest's when its session opens): unknown formats
//! are dropped, and the integer ranges they implied become
//! `minimum`/`maximum`.

use serde_json::{Map, Value};

/// The `format` values JSON Schema 2020-12 defines.
const STANDARD_FORMATS: [&str; 19] = [
    "date-time",
    "date",
    "time",
    "duration",
    "email",
    "idn-email",
    "hostname",
    "idn-hostname",
    "ipv4",
    "ipv6",
    "uri",
    "uri-reference",
    "iri",
    "iri-reference",
    "uuid",
    "uri-template",
    "json-pointer",
    "relative-json-pointer",
    "regex",
];

/// A tool with both its schemas standardised.
pub fn standardise_tool(tool: &mut rmcp::model::Tool) {
    let mut input = (*tool.input_schema).clone();
    standardise(&mut input);
    tool.input_schema = std::sync::Arc::new(input);
    if let Some(output) = &tool.output_schema {
        let mut output = (**output).clone();
        standardise(&mut output);
        tool.output_schema = Some(std::sync::Arc::new(output));
    }
}

/// Rewrites `schema` in place, recursively.
pub fn standardise(schema: &mut Map<String, Value>) {
    if let Some(Value::String(format)) = schema.get("format")
        && !STANDARD_FORMATS.contains(&format.as_str())
    {
        let format = format.clone();
        schema.remove("format");
        if let Some((min, max)) = integer_range(&format) {
            schema.entry("minimum").or_insert(Value::from(min));
            if let Some(max) = max {
                schema.entry("maximum").or_insert(Value::from(max));
            }
        }
    }
    for (key, value) in schema.iter_mut() {
        match key.as_str() {
            // Values, not schemas: left as they are.
            "default" | "const" | "enum" | "examples" => {}
            // Maps from names to schemas: every value is a schema, whatever
            // its name (a property may be called "default").
            "properties" | "patternProperties" | "$defs" | "definitions" | "dependentSchemas" => {
                if let Value::Object(named) = value {
                    for schema in named.values_mut() {
                        if let Value::Object(schema) = schema {
                            standardise(schema);
                        }
                    }
                }
            }
            _ => standardise_value(value),
        }
    }
}

fn standardise_value(value: &mut Value) {
    match value {
        Value::Object(map) => standardise(map),
        Value::Array(items) => items.iter_mut().for_each(standardise_value),
        _ => {}
    }
}

/// The range a schemars integer format stands for. Bounds beyond 2^53
/// are left out: a JSON number cannot carry them exactly.
fn integer_range(format: &str) -> Option<(i64, Option<i64>)> {
    Some(match format {
        "uint8" => (0, Some(u8::MAX.into())),
        "uint16" => (0, Some(u16::MAX.into())),
        "uint32" => (0, Some(u32::MAX.into())),
        "uint64" | "uint" | "uint128" => (0, None),
        "int8" => (i8::MIN.into(), Some(i8::MAX.into())),
        "int16" => (i16::MIN.into(), Some(i16::MAX.into())),
        "int32" => (i32::MIN.into(), Some(i32::MAX.into())),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn integer_formats_become_bounds_and_unknown_formats_go() {
        let mut schema = json!({
            "type": "object",
            "properties": {
                "vcpus": {"type": "integer", "format": "uint32", "minimum": 1, "maximum": 32},
                "bytes": {"type": ["integer", "null"], "format": "uint64", "minimum": 0},
                "ratio": {"type": "number", "format": "double"},
                "offset": {"type": "integer", "format": "int32"},
                "when": {"type": "string", "format": "date-time"},
                "list": {"type": "array", "items": {"type": "integer", "format": "uint16"}},
                "either": {"anyOf": [{"type": "integer", "format": "uint8"}, {"type": "null"}]},
                "default": {"type": "integer", "format": "uint16", "default": {"format": "uint8"}}
            }
        });
        standardise(schema.as_object_mut().expect("an object"));
        let p = &schema["properties"];
        assert_eq!(
            p["vcpus"],
            json!({"type": "integer", "minimum": 1, "maximum": 32})
        );
        assert_eq!(
            p["bytes"],
            json!({"type": ["integer", "null"], "minimum": 0})
        );
        assert_eq!(p["ratio"], json!({"type": "number"}));
        assert_eq!(
            p["offset"],
            json!({"type": "integer", "minimum": i32::MIN, "maximum": i32::MAX})
        );
        assert_eq!(p["when"]["format"], "date-time");
        assert_eq!(p["list"]["items"]["maximum"], 65535);
        assert_eq!(p["either"]["anyOf"][0]["maximum"], 255);
        // A property named like a keyword is still a schema; a default is a value.
        assert_eq!(p["default"]["maximum"], 65535);
        assert_eq!(p["default"]["default"], json!({"format": "uint8"}));
        let text = schema.to_string().replace(r#"{"format":"uint8"}"#, "");
        assert!(!text.contains("uint"), "{schema}");
    }
}
