//! `${claim}` templates in grants, resolved from verified claims only. Parsed at load time so a
//! typo is a load error, not a surprise at mint time.

use crate::claims::Claims;
use crate::claims::scalar_text;
use crate::names::is_claim_name;
use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Literal(String),
    Claim(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

impl Template {
    /// `${name}` inserts a claim; `$${` is a literal `${`; any other `$` is literal.
    pub fn parse(text: &str) -> Result<Template, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(pos) = rest.find('$') {
            literal.push_str(&rest[..pos]);
            rest = &rest[pos..];
            if let Some(after) = rest.strip_prefix("$${") {
                literal.push_str("${");
                rest = after;
            } else if let Some(after) = rest.strip_prefix("${") {
                let end = after.find('}').ok_or("unclosed `${` in template")?;
                let name = &after[..end];
                if !is_claim_name(name) {
                    return Err(format!("`${{{}}}` does not name a claim", crate::clock::truncate(name, 40)));
                }
                if !literal.is_empty() {
                    parts.push(Part::Literal(std::mem::take(&mut literal)));
                }
                parts.push(Part::Claim(name.to_string()));
                rest = &after[end + 1..];
            } else {
                literal.push('$');
                rest = &rest[1..];
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Literal(literal));
        }
        Ok(Template(parts))
    }

    /// The claims it reads, in order (for lints that ask who chooses a rendered value).
    pub fn claims(&self) -> impl Iterator<Item = &str> {
        self.0.iter().filter_map(|p| match p {
            Part::Claim(name) => Some(name.as_str()),
            Part::Literal(_) => None,
        })
    }

    /// Renders with verified claims. A missing or non-scalar claim is an error naming it.
    pub fn render(&self, claims: &Claims) -> Result<String, String> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Literal(l) => out.push_str(l),
                Part::Claim(name) => out.push_str(&claims.get(name).and_then(scalar_text).ok_or_else(|| name.clone())?),
            }
        }
        Ok(out)
    }
}

/// A JSON value whose strings are templates (for a broker JWT's extra claims).
#[derive(Debug, Clone)]
pub enum TemplateValue {
    Text(Template),
    Literal(Value),
    List(Vec<TemplateValue>),
    Map(Vec<(String, TemplateValue)>),
}

impl TemplateValue {
    pub fn parse(value: &Value) -> Result<TemplateValue, String> {
        Ok(match value {
            Value::String(s) => TemplateValue::Text(Template::parse(s)?),
            Value::Array(items) => {
                TemplateValue::List(items.iter().map(TemplateValue::parse).collect::<Result<_, _>>()?)
            }
            Value::Object(map) => TemplateValue::Map(
                map.iter().map(|(k, v)| Ok((k.clone(), TemplateValue::parse(v)?))).collect::<Result<_, String>>()?,
            ),
            other => TemplateValue::Literal(other.clone()),
        })
    }

    pub fn render(&self, claims: &Claims) -> Result<Value, String> {
        Ok(match self {
            TemplateValue::Text(t) => Value::String(t.render(claims)?),
            TemplateValue::Literal(v) => v.clone(),
            TemplateValue::List(items) => {
                Value::Array(items.iter().map(|i| i.render(claims)).collect::<Result<_, _>>()?)
            }
            TemplateValue::Map(entries) => Value::Object(
                entries.iter().map(|(k, v)| Ok((k.clone(), v.render(claims)?))).collect::<Result<_, String>>()?,
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn templates_resolve_claims_and_refuse_missing_ones() {
        let claims: Claims =
            serde_json::from_value(json!({"repository": "acme/web", "run_id": "7", "groups": ["a"]})).unwrap();
        let t = Template::parse("repo:${repository}@${run_id} costs $5 and $${literal}").unwrap();
        assert_eq!(t.render(&claims).unwrap(), "repo:acme/web@7 costs $5 and ${literal}");
        assert_eq!(Template::parse("${missing}").unwrap().render(&claims).unwrap_err(), "missing");
        assert_eq!(Template::parse("${groups}").unwrap().render(&claims).unwrap_err(), "groups");
        assert!(Template::parse("${repository").is_err());
        assert!(Template::parse("${a b}").is_err());
    }
}
