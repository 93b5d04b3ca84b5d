//! A failure in the form Flink's REST client reads: `failure-cause` of an asynchronous
//! operation carries a Java-serialized `org.apache.flink.util.SerializedThrowable`
//! (`serialized-throwable`, base64), which the client deserializes and rethrows. The stream
//! below is the Java Object Serialization form of such an object holding a class name and a
//! message, with no stack frames and no nested exception.

use base64::Engine as _;
use serde_json::{Value, json};

const STREAM_MAGIC: [u8; 4] = [0xAC, 0xED, 0x00, 0x05];
const TC_NULL: u8 = 0x70;
const TC_CLASSDESC: u8 = 0x72;
const TC_OBJECT: u8 = 0x73;
const TC_STRING: u8 = 0x74;
const TC_LONGSTRING: u8 = 0x7C;
const TC_ENDBLOCKDATA: u8 = 0x78;
const SC_WRITE_METHOD: u8 = 0x01;
const SC_SERIALIZABLE: u8 = 0x02;

/// A serializable class as the stream describes it: name, serialVersionUID, flags, and its
/// fields (type code, name, JVM type signature), sorted the way Java sorts them.
struct ClassDesc {
    name: &'static str,
    uid: i64,
    flags: u8,
    fields: &'static [(u8, &'static str, &'static str)],
}

const SERIALIZED_THROWABLE: ClassDesc = ClassDesc {
    name: "org.apache.flink.util.SerializedThrowable",
    uid: 7_284_183_123_441_947_635,
    flags: SC_SERIALIZABLE,
    fields: &[
        (b'L', "fullStringifiedStackTrace", "Ljava/lang/String;"),
        (b'L', "originalErrorClassName", "Ljava/lang/String;"),
        (b'[', "serializedException", "[B"),
    ],
};

const EXCEPTION: ClassDesc = ClassDesc {
    name: "java.lang.Exception",
    uid: -3_387_516_993_124_229_948,
    flags: SC_SERIALIZABLE,
    fields: &[],
};

const THROWABLE: ClassDesc = ClassDesc {
    name: "java.lang.Throwable",
    uid: -3_042_686_055_658_047_285,
    flags: SC_SERIALIZABLE | SC_WRITE_METHOD,
    fields: &[
        (b'L', "cause", "Ljava/lang/Throwable;"),
        (b'L', "detailMessage", "Ljava/lang/String;"),
        (b'[', "stackTrace", "[Ljava/lang/StackTraceElement;"),
        (b'L', "suppressedExceptions", "Ljava/util/List;"),
    ],
};

/// Java's "modified UTF-8": UTF-16 units, NUL as two bytes, surrogates encoded one by one.
fn modified_utf8(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    for unit in s.encode_utf16() {
        match unit {
            0x0001..=0x007F => out.push(unit as u8),
            0x0000 | 0x0080..=0x07FF => {
                out.push(0xC0 | (unit >> 6) as u8);
                out.push(0x80 | (unit & 0x3F) as u8);
            }
            _ => {
                out.push(0xE0 | (unit >> 12) as u8);
                out.push(0x80 | ((unit >> 6) & 0x3F) as u8);
                out.push(0x80 | (unit & 0x3F) as u8);
            }
        }
    }
    out
}

/// A name in a class descriptor: u16 length and modified UTF-8 (names are short ASCII).
fn put_utf(out: &mut Vec<u8>, s: &str) {
    let b = modified_utf8(s);
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(&b);
}

/// A new string object (never a back reference, so no handle bookkeeping is needed).
fn put_string(out: &mut Vec<u8>, s: &str) {
    let b = modified_utf8(s);
    match u16::try_from(b.len()) {
        Ok(n) => {
            out.push(TC_STRING);
            out.extend_from_slice(&n.to_be_bytes());
        }
        Err(_) => {
            out.push(TC_LONGSTRING);
            out.extend_from_slice(&(b.len() as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&b);
}

fn put_class_desc(out: &mut Vec<u8>, chain: &[&ClassDesc]) {
    let Some((first, rest)) = chain.split_first() else {
        out.push(TC_NULL);
        return;
    };
    out.push(TC_CLASSDESC);
    put_utf(out, first.name);
    out.extend_from_slice(&first.uid.to_be_bytes());
    out.push(first.flags);
    out.extend_from_slice(&(first.fields.len() as u16).to_be_bytes());
    for (code, name, signature) in first.fields {
        out.push(*code);
        put_utf(out, name);
        put_string(out, signature);
    }
    out.push(TC_ENDBLOCKDATA);
    put_class_desc(out, rest);
}

/// The serialized `SerializedThrowable` of an exception of class `class` with `message`.
fn serialized_throwable(class: &str, message: &str) -> Vec<u8> {
    let text = format!("{class}: {message}");
    let mut out = STREAM_MAGIC.to_vec();
    out.push(TC_OBJECT);
    put_class_desc(&mut out, &[&SERIALIZED_THROWABLE, &EXCEPTION, &THROWABLE]);
    // Field values, from the topmost serializable superclass down.
    out.push(TC_NULL); // Throwable.cause: none
    put_string(&mut out, &text); // Throwable.detailMessage
    out.push(TC_NULL); // Throwable.stackTrace: read as empty
    out.push(TC_NULL); // Throwable.suppressedExceptions: read as none
    out.push(TC_ENDBLOCKDATA); // end of Throwable's writeObject data
    put_string(&mut out, &format!("{text}\n")); // fullStringifiedStackTrace
    put_string(&mut out, class); // originalErrorClassName
    out.push(TC_NULL); // serializedException: the client keeps this object as the error
    out
}

/// The `failure-cause` of an asynchronous operation that failed with `message`, as Flink
/// writes it: class, text, and the serialized throwable its client rethrows.
pub fn failure_cause(class: &str, message: &str) -> Value {
    let bytes = serialized_throwable(class, message);
    json!({
        "class": class,
        "stack-trace": format!("{class}: {message}"),
        "serialized-throwable": base64::engine::general_purpose::STANDARD.encode(bytes),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modified_utf8_encodes_nul_and_astral_characters_the_java_way() {
        assert_eq!(modified_utf8("a\0"), vec![b'a', 0xC0, 0x80]);
        assert_eq!(modified_utf8("é"), vec![0xC3, 0xA9]);
        // U+1F600 as a surrogate pair, each unit in three bytes.
        assert_eq!(
            modified_utf8("😀"),
            vec![0xED, 0xA0, 0xBD, 0xED, 0xB8, 0x80]
        );
    }

    #[test]
    fn the_stream_names_the_class_chain_and_carries_the_message() {
        let b = serialized_throwable("java.io.IOException", "disk full");
        assert_eq!(&b[..5], &[0xAC, 0xED, 0x00, 0x05, TC_OBJECT]);
        let text = String::from_utf8_lossy(&b);
        for part in [
            "org.apache.flink.util.SerializedThrowable",
            "java.lang.Exception",
            "java.lang.Throwable",
            "java.io.IOException: disk full",
        ] {
            assert!(text.contains(part), "{part}");
        }
        let long = "x".repeat(70_000);
        let b = serialized_throwable("E", &long);
        assert!(b.contains(&TC_LONGSTRING));
    }
}
